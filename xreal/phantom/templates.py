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


def template_finding_mask(name: str, labels: list[str], size: int) -> np.ndarray:
    """Where the phantom itself renders ``labels`` on built-in template ``name``: the union of their masks (bool).

    A manifest row on that template can ask for its findings there instead of in boxes around them; a box is
    filled whole by the model, so a box around a round nodule gives a square one.
    """
    case = phantom.generate(1, size, template_seed(name), pathologies=[labels])[0]
    if not case.pathology_masks:
        raise MaskError(f"{name}: no finding to locate in {labels!r}")
    return np.any(list(case.pathology_masks.values()), axis=0)
