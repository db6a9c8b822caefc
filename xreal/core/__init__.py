"""Shared basics, the bottom layer: every other subpackage may import it; it imports nothing else of xreal.

It owns the label vocabulary and anatomy ids (``labels``), binary masks, label
maps and their files and RLE (``masks``), 16-bit images (``images``), safe ids and
paths, atomic writes, checksums and JSON records (``files``), the error types
(``errors``), the sampler's default settings (``settings``), the sha256-pinned
records of model bundles and judge sets and the demo bundle's place
(``records``), and the locked cache of torchxrayvision weights (``weights``).
The records and the weight cache sit here rather than with the model or the
judges because the model, the judges, the run and ``xreal verify`` all check
files against them, and a judge set's record names weight files; neither
imports torch at module level nor anything above this layer.
"""
