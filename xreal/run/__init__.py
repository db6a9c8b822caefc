"""A run: from a manifest to a finished, audited dataset.

It owns the run's configuration, identity and preflight (``config``),
generation in batches with judging and retries, resumable (``generation``), the
quality policy that turns judge scores into decisions (``policy``), the dataset
writer, its card and the ``XRealDataset`` reader (``dataset``), the audit of a
finished run (``audit``) and the check of mounted model files (``verify``). It may
import every subpackage below it: ``core``, ``phantom``, ``data``, ``manifest``,
``judges`` and ``model``. ``flows/`` (Prefect) and ``xreal.cli`` call it; it never
imports them.
"""
