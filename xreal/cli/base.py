"""The root of the ``xreal`` command line. User errors print one paragraph and exit with status 2."""

from __future__ import annotations

import click

from xreal.core.errors import XRealError
from xreal.core.labels import canonical_label

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT


def label_values(entries: tuple[str, ...], option: str) -> dict[str, float]:
    """An option's LABEL=VALUE entries as a table, labels spelt as CheXpert does (``option`` names it in errors)."""
    table = {}
    for entry in entries:
        label, sep, value = entry.rpartition("=")
        try:
            if not sep:
                raise ValueError("expected LABEL=VALUE, e.g. Edema=4")
            table[canonical_label(label)] = float(value)
        except ValueError as error:
            raise XRealError(f"{option} {entry!r}: {error}") from None
    return table


class UserError(click.ClickException):
    exit_code = EXIT_USER_ERROR

    def format_message(self) -> str:
        return self.message


class _Group(click.Group):
    """Turns library errors a user can fix into a clean message instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except XRealError as exc:
            raise UserError(str(exc)) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
            raise UserError(f"{exc.strerror}: {exc.filename}") from None
        except KeyboardInterrupt:  # Ctrl-C: the shell's status for it (click's own says 1, "Aborted!")
            click.echo("interrupted", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="xreal")
def cli() -> None:
    """xreal: labelled synthetic chest X-rays from anatomy and pathology masks (XReal)."""
