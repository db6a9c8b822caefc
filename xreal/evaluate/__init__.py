"""Evaluation: is a generated dataset any good? (``xreal evaluate``).

It owns the metrics (``metrics``: Fréchet distance, KID, precision/recall/
density/coverage, MS-SSIM, control figures, AUROC, bootstrap intervals), reading
a finished run and a training set for evaluation (``inputs``), the report
(``report``: every figure into ``report.json``; ``html``: the pictures), the
usefulness experiment (``utility``) and the CheXGenBench export
(``chexgenbench``). It sits above ``xreal.run`` and may import every subpackage
below it; only ``xreal.cli`` imports it.
"""
