"""The ``evaluate`` commands: a run's report (the default), a training set's feature bank, usefulness."""

from __future__ import annotations

from pathlib import Path

import click

from xreal.cli.base import _Group, cli


class _RunByDefault(_Group):
    """``xreal evaluate RUN ...`` means ``xreal evaluate run RUN ...``; ``bank`` and ``utility`` are commands."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@cli.group(cls=_RunByDefault)
def evaluate() -> None:
    """Is a generated dataset any good? Fidelity, diversity, control, memorisation and usefulness.

    \b
    xreal evaluate RUN --reference TRAINING_SET --out REPORT_DIR    the report (report.json, report.html)
    xreal evaluate bank TRAINING_SET --out BANK_DIR                 the memorisation judge's feature bank
    xreal evaluate utility --real TRAIN --synthetic RUN --test TEST  does the synthetic data help a classifier?
    """


_judges_option = click.option(
    "--judges",
    default=None,
    help="Judge set that measures: 'phantom' (the demo bundle's), 'torchxrayvision' (pretrained, from the "
    "hash-pinned weight cache) or a judge set folder. Default: the one the run was judged with.",
)


@evaluate.command("run")
@click.argument("run", type=click.Path(path_type=Path))
@click.option(
    "--reference",
    required=True,
    type=click.Path(path_type=Path),
    help="Training set of real images (the model's training data): fidelity and memorisation are measured against it.",
)
@click.option(
    "--test",
    type=click.Path(path_type=Path),
    default=None,
    help="Held-out real images for the memorisation threshold (default: the reference's validate/test rows).",
)
@_judges_option
@click.option("--bank", type=click.Path(path_type=Path), default=None, help="Feature bank from `xreal evaluate bank`.")
@click.option("--labels", default=None, help="Comma-separated labels to evaluate (default: every label the run asks).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Report folder.")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the bootstrap and random pairings.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run_report(run, reference, test, judges, bank, labels, out, batch_size, seed, quiet) -> None:
    """Evaluate a finished run against real images: report.json and a self-contained report.html."""
    from xreal.evaluate.report import EvaluationSettings, evaluate_run

    chosen = [part.strip() for part in labels.split(",") if part.strip()] if labels else None
    settings = EvaluationSettings(batch_size=batch_size, seed=seed)
    report = evaluate_run(
        run, reference, out, test=test, judges=judges, bank=bank, labels=chosen, settings=settings, progress=not quiet
    )
    click.echo(summary_text(report))
    click.echo(f"report: {out / 'report.html'}")


def summary_text(report: dict) -> str:
    """A few lines a terminal user reads: the headline figures and any warning."""
    fidelity, control, memo = report["fidelity"], report["control"]["accepted"], report["memorisation"]

    def show(entry, digits=3):
        if not entry or entry.get("value") is None:
            return "-"
        text = f"{entry['value']:.{digits}f}"
        if entry.get("low") is not None:
            text += f" [{entry['low']:.{digits}f}, {entry['high']:.{digits}f}]"
        return text

    lines = [
        f"Fréchet distance {show(fidelity['synthetic']['frechet'], 2)} "
        f"(real vs real {show(fidelity['real_vs_real']['frechet'], 2)})",
        f"anatomy Dice {show(control['anatomy_dice'])} (random pairing "
        f"{show(control['anatomy_dice_random_pairing'])}); change inside the mask {show(control['inside_mask'])}",
        f"requested label found {control['hit_rate_mean']:.3f} (mean over labels)"
        if control["hit_rate_mean"] is not None
        else "requested label found: not judged",
        f"likely copies {show(memo['rate'])} (tau {memo['tau']:.4f})",
        *[f"warning: {w}" for w in report["warnings"]],
    ]
    return "\n".join(lines)


@evaluate.command("bank")
@click.argument("training_set", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Feature bank folder.")
@click.option(
    "--judges", "judges_source", default=None, help="Judge set whose features the bank holds (default: the demo's)."
)
@click.option(
    "--held-out",
    type=click.Path(path_type=Path),
    default=None,
    help="Held-out real images for tau (default: the training set's validate/test rows).",
)
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1))
def bank(training_set, out, judges_source, held_out, batch_size) -> None:
    """Build a training set's feature bank for the memorisation judge (policy: memorisation.bank)."""
    from xreal.core.records import DEMO_BUNDLE
    from xreal.judges.memorisation import build_feature_bank, load_feature_bank

    source = judges_source or str(DEMO_BUNDLE / "judges")
    folder = build_feature_bank(training_set, source, out, held_out=held_out, batch_size=batch_size)
    built = load_feature_bank(folder)
    click.echo(f"feature bank: {folder} ({len(built.image_ids)} training images, tau {built.tau:.4f})")


@evaluate.command("utility")
@click.option("--real", required=True, type=click.Path(path_type=Path), help="Training set of real images.")
@click.option("--synthetic", required=True, type=click.Path(path_type=Path), help="A finished run.")
@click.option("--test", required=True, type=click.Path(path_type=Path), help="Held-out real images to test on.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Report folder.")
@click.option(
    "--real-count", default=200, show_default=True, type=click.IntRange(1), help="Real images used (scarce setting)."
)
@click.option("--size", default=64, show_default=True, type=click.IntRange(16, 1024))
@click.option("--steps", default=300, show_default=True, type=click.IntRange(1), help="Optimisation steps per phase.")
@click.option("--seed", default=0, show_default=True, type=int)
def utility(real, synthetic, test, out, real_count, size, steps, seed) -> None:
    """Does the synthetic data help? A classifier trained on real, real + synthetic, synthetic then real."""
    from xreal.core.files import write_json
    from xreal.evaluate.html import UTILITY_FILE
    from xreal.evaluate.utility import run_utility, utility_table

    result = run_utility(real, synthetic, test, size=size, real_count=real_count, steps=steps, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / UTILITY_FILE, result)
    click.echo(utility_table(result))
