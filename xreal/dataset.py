"""The old path of :mod:`xreal.run.dataset`, kept for one release: import from ``xreal.run.dataset`` instead.

Dataset cards written before the move show ``from xreal.dataset import XRealDataset``;
that keeps working, with a DeprecationWarning.
"""

import warnings

warnings.warn(
    "xreal.dataset moved to xreal.run.dataset; import from there (the old path goes in the next release)",
    DeprecationWarning,
    stacklevel=2,
)

from xreal.run.dataset import *  # noqa: E402, F403
from xreal.run.dataset import _relative, _write_file  # noqa: E402, F401 - the names `*` leaves out
