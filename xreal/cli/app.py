"""The ``xreal`` command line. User errors print one paragraph and exit with status 2."""

from __future__ import annotations

from xreal.cli import data, evaluate, export, manifest, model, run, weights  # noqa: F401 - importing a command group registers it
from xreal.cli.base import cli


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="xreal")


if __name__ == "__main__":
    main()
