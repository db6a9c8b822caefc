"""Built-in anatomy templates: ``phantom-<n>`` names the phantom anatomy of seed n, rendered at any size."""

from __future__ import annotations

import re

import numpy as np

from xreal.core.errors import MaskError
from xreal.phantom import renderer as phantom

TEMPLATE_PATTERN = re.compile(r"phantom-(\d{1,9})")  # full match: no surrounding space or newline
TEMPLATE_HELP = "built-in templates are named 'phantom-<n>' with n a whole number (the phantom anatomy of seed n)"


def template_seed(name: str) -> int:
    """The phantom seed of a built-in template name such as ``"phantom-12"``."""
    match = TEMPLATE_PATTERN.fullmatch(name) if isinstance(name, str) else None
    if not match:
        raise MaskError(f"unknown anatomy template {name!r}; {TEMPLATE_HELP}")
    return int(match.group(1))


def template_label_map(name: str, size: int) -> np.ndarray:
    """Render the label map of a built-in template at ``size`` x ``size``."""
    return phantom.anatomy_template(template_seed(name), size)
