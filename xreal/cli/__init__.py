"""The ``xreal`` command line, the top layer: one module per command group.

``base`` holds the root group and how a user error becomes one paragraph and
exit status 2; ``data`` the ``phantom`` and ``ingest`` commands (training sets
in); ``manifest`` the ``manifest`` group; ``model`` the ``train`` group and
``import-reference``; ``run`` ``generate``, ``serve``, ``submit`` and ``audit run``;
``evaluate`` the ``evaluate`` group (a run's report, feature banks, usefulness);
``export`` the ``export`` group (CheXGenBench); ``weights`` the ``weights`` group and
``verify``; ``app`` puts them together and
is the console script's entry point (``xreal.cli:main``). It may import anything in
xreal and ``flows/`` (it starts flows for runs); nothing imports it.
"""

from xreal.cli.app import cli, main

__all__ = ["cli", "main"]
