"""``report.html``: the evaluation report as pictures and tables, in one self-contained file.

Every figure is a matplotlib PNG embedded as a data URI (:mod:`xreal.core.figures`),
so the page opens offline, anywhere. Each section says how to read it.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from xreal.core.figures import figure_html, figure_uri, page_html, pyplot, table_html
from xreal.core.files import atomic_path
from xreal.core.labels import score_key
from xreal.evaluate.inputs import FinishedRun, TrainingSet, image_batches

REPORT_HTML = "report.html"
UTILITY_FILE = "utility.json"
GRID = 8  # images per row of a label's grid


def write_report_html(
    report: dict[str, Any],
    out: str | os.PathLike[str],
    run: FinishedRun,
    reference: TrainingSet,
    per_sample: pd.DataFrame,
    seed: int = 0,
) -> Path:
    """Write ``report.html`` beside ``report.json`` in ``out``."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    labels = report["settings"]["labels"]
    sections = [
        _summary(report),
        _fidelity(report),
        _grids(run, reference, labels, rng),
        _scores(run, per_sample, labels),
        _control(report, per_sample),
        _diversity(report),
        _memorisation(report, run, reference, per_sample),
        _utility(out),
        _provenance(report),
    ]
    path = out / REPORT_HTML
    with atomic_path(path) as tmp:
        tmp.write_text(page_html(f"xreal evaluation: {run.root.name}", sections))
    return path


def _value(entry: dict[str, Any] | None, key: str = "value") -> float | None:
    return None if entry is None else entry.get(key)


def _with_interval(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("value") is None:
        return "–"
    text = f"{entry['value']:.3f}"
    if entry.get("low") is not None and entry.get("high") is not None:
        text += f" [{entry['low']:.3f}, {entry['high']:.3f}]"
    return text


def _summary(report: dict[str, Any]) -> str:
    fidelity, control, memorisation = report["fidelity"], report["control"]["accepted"], report["memorisation"]
    diversity = report["diversity"]
    synthetic, real = fidelity["synthetic"], fidelity["real_vs_real"]
    rows = [
        (
            "Fréchet distance (features2)",
            _with_interval(synthetic["frechet"]),
            _with_interval(real["frechet"]),
            "lower is closer to the real images; compare with real vs real at the same size",
        ),
        ("KID", _fmt(_value(synthetic["kid"])), _fmt(_value(real["kid"])), "lower is better; about 0 when alike"),
        *[
            (f"{name}", _fmt((synthetic["prdc"] or {}).get(name)), _fmt((real["prdc"] or {}).get(name)), reading)
            for name, reading in (
                ("precision", "share of synthetic images inside the real manifold (realism)"),
                ("recall", "share of real variety the synthetic images reach"),
                ("density", "about 1 when synthetic images sit where real ones crowd"),
                ("coverage", "share of real images with a synthetic neighbour"),
            )
        ],
        (
            "MS-SSIM across requests",
            _with_interval(diversity["across_requests"]),
            _with_interval(diversity["real_pairs"]),
            "lower is more diverse; real vs real: random pairs of real images",
        ),
        (
            "anatomy Dice",
            _with_interval(control["anatomy_dice"]),
            _with_interval(control["anatomy_dice_random_pairing"]),
            "beside: Dice against a random other request",
        ),
        (
            "anatomy control recovered",
            _fmt(control["anatomy_recovered"]),
            "–",
            "(Dice - random pairing) / (segmenter ceiling - random pairing)",
        ),
        (
            "change inside the mask",
            _with_interval(control["inside_mask"]),
            "–",
            "share of |image - healthy twin| strictly inside the requested mask",
        ),
        (
            "change within one latent cell",
            _with_interval(control["within_latent_cell"]),
            "–",
            "the same, the mask grown by one latent cell",
        ),
        ("requested label found (mean of labels)", _fmt(control["hit_rate_mean"]), "–", "the judge's hit rate"),
        (
            "likely copies (≥ tau)",
            _with_interval(memorisation["rate"]),
            "–",
            f"tau = {memorisation['tau']:.4f}: nearest training similarity at or above it",
        ),
    ]
    warnings = "".join(f'<p class="warn">{html.escape(w)}</p>' for w in report["warnings"])
    run = report["run"]
    intro = (
        f"<p>Run <code>{html.escape(str(run['path']))}</code>: {run['accepted']} accepted of "
        f"{run['samples']} samples ({run['drawn_on_disk']} on disk), against "
        f"{report['reference']['images']} reference images, measured with the "
        f"{html.escape(report['judges']['kind'])} judge set. Intervals are bootstrap 95%.</p>"
    )
    return (
        "<h2>Summary</h2>"
        + intro
        + warnings
        + table_html(["figure", "synthetic (accepted)", "real vs real / baseline", "how to read it"], rows)
    )


def _fmt(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _fidelity(report: dict[str, Any]) -> str:
    per_label = report["fidelity"]["per_label"]
    rows = [
        (
            label,
            entry["synthetic"],
            entry["reference"],
            _with_interval(entry["frechet"]),
            _with_interval(entry["real_vs_real"]),
        )
        for label, entry in per_label.items()
    ]
    all_draws = report["fidelity"].get("all_draws")
    extra = (
        f"<p>Every draw on disk (rejected included, as many drawn at random as were accepted): Fréchet distance "
        f"{_with_interval(all_draws['frechet'])}; the gap to the accepted figure is what the quality gate buys.</p>"
        if all_draws
        else ""
    )
    return (
        "<h2>Fidelity per label</h2><p>Fréchet distance on the judges' features between the accepted "
        "images showing a label and the reference images showing it, beside two halves of those reference images "
        "(as many as the synthetic ones). A Fréchet distance grows as samples shrink: compare within a row.</p>"
        + table_html(["label", "synthetic", "reference", "Fréchet distance", "real vs real"], rows)
        + extra
    )


def _load(paths: Sequence[Path]) -> list[np.ndarray]:
    return list(next(image_batches(list(paths), len(paths)))) if paths else []


def _grids(run: FinishedRun, reference: TrainingSet, labels: Sequence[str], rng) -> str:
    plt = pyplot()
    parts = [
        "<h2>Images per label</h2><p>For each label: accepted images, rejected images (when the run kept them) and "
        "real reference images showing the label, drawn at random.</p>"
    ]
    samples = run.samples[run.samples["image_path"].notna()]
    for label in labels:
        asks = samples[[label in row for row in samples["labels"]]]
        rows = []
        for decision in ("accepted", "rejected"):
            chosen = asks[asks["decision"] == decision]
            picked = chosen.iloc[rng.permutation(len(chosen))[:GRID]]
            rows.append((decision, _load([run.path(p) for p in picked["image_path"]])))
        positives = np.flatnonzero(reference.positives(label))
        rows.append(("real", _load(reference.paths(rng.permutation(positives)[:GRID]))))
        fig, axes = plt.subplots(3, GRID, figsize=(GRID * 1.1, 3.6))
        for r, (name, images) in enumerate(rows):
            for c in range(GRID):
                ax = axes[r, c]
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if c < len(images):
                    ax.imshow(images[c], cmap="gray", vmin=0, vmax=1)
                if c == 0:
                    ax.set_ylabel(name, fontsize=9)
        fig.suptitle(label, fontsize=11)
        parts.append(figure_html(figure_uri(fig), f"{label}: accepted (top), rejected (middle), real (bottom)."))
    return "".join(parts)


def _scores(run: FinishedRun, per_sample: pd.DataFrame, labels: Sequence[str]) -> str:
    plt = pyplot()
    judged = [label for label in labels if score_key("p", label) in run.samples]
    if not judged:
        return ""
    columns = min(4, len(judged))
    rows = math.ceil(len(judged) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.5 * rows), squeeze=False)
    bins = np.linspace(0, 1, 21)
    twin_scores = dict(zip(per_sample["sample_id"], per_sample["twin_requested_label_score"], strict=True))
    for ax, label in zip(axes.flat, judged, strict=False):
        asks = run.samples[[label in row for row in run.samples["labels"]]]
        key = score_key("p", label)
        for decision, colour in (("accepted", "tab:green"), ("rejected", "tab:red")):
            values = asks.loc[asks["decision"] == decision, key].dropna().clip(0, 1)
            ax.hist(values, bins=bins, alpha=0.6, color=colour, label=f"{decision} ({len(values)})")
        twins = [twin_scores.get(s) for s in asks["sample_id"]]
        twins = np.clip([t for t in twins if t is not None and not math.isnan(t)], 0, 1)
        if len(twins):
            ax.hist(twins, bins=bins, histtype="step", color="black", label=f"healthy twin ({len(twins)})")
        ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(judged) :]:
        ax.axis("off")
    fig.tight_layout()
    return "<h2>Judge scores</h2>" + figure_html(
        figure_uri(fig),
        "The gate's calibrated score of the requested label (0.5, dashed, is the operating point) on images asking "
        "for it, accepted and rejected, and on their healthy twins (which should stay below 0.5).",
    )


def _control(report: dict[str, Any], per_sample: pd.DataFrame) -> str:
    parts = ["<h2>Control</h2>"]
    ceiling = report["control"]["segmenter_ceiling"]
    for subset in ("accepted", "all_draws"):
        section = report["control"].get(subset)
        if not section:
            continue
        title = "accepted images" if subset == "accepted" else "every draw (before the gate)"
        parts.append(
            f"<h3>{title}</h3><p>Anatomy Dice {_with_interval(section['anatomy_dice'])}; by random pairing "
            f"{_with_interval(section['anatomy_dice_random_pairing'])}; the segmenter on real images "
            f"{_with_interval(ceiling)}; recovered {_fmt(section['anatomy_recovered'])}.</p>"
        )
        rows = [
            (
                label,
                entry["samples"],
                _with_interval(entry.get("hit_rate")),
                _with_interval(entry.get("twin_positive_rate")),
                _with_interval(entry.get("auroc")),
                _with_interval(entry.get("anatomy_dice")),
                _with_interval(entry.get("inside_mask")),
                _with_interval(entry.get("within_latent_cell")),
            )
            for label, entry in section["per_label"].items()
        ]
        parts.append(
            table_html(
                [
                    "label",
                    "samples",
                    "hit rate",
                    "twin called positive",
                    "AUROC",
                    "anatomy Dice",
                    "change in mask",
                    "within one cell",
                ],
                rows,
            )
        )
    plt = pyplot()
    values = per_sample[["anatomy_dice", "anatomy_dice_random_pairing"]].dropna()
    if len(values):
        fig, ax = plt.subplots(figsize=(5, 2.6))
        bins = np.linspace(0, 1, 26)
        ax.hist(values["anatomy_dice_random_pairing"], bins=bins, alpha=0.6, label="random pairing", color="grey")
        ax.hist(values["anatomy_dice"], bins=bins, alpha=0.6, label="requested anatomy", color="tab:blue")
        if ceiling.get("value") is not None:
            ax.axvline(ceiling["value"], color="black", linestyle="--", label="segmenter ceiling")
        ax.set_xlabel("mean Dice of lungs and heart")
        ax.legend(fontsize=7)
        parts.append(
            figure_html(
                figure_uri(fig),
                "Anatomy Dice of each image with its requested map (blue) and with another request's map (grey): "
                "the further blue sits from grey towards the ceiling, the more the anatomy control does.",
            )
        )
    return "".join(parts)


def _diversity(report: dict[str, Any]) -> str:
    diversity = report["diversity"]
    rows = [
        (name.replace("_", " "), _with_interval(diversity[name]), diversity[name]["pairs"])
        for name in ("within_request", "across_requests", "real_pairs")
    ]
    return (
        "<h2>Diversity</h2><p>MS-SSIM between pairs of images (1: identical; lower is more diverse). Replicas of "
        "one request share anatomy and labels, so they are more alike than images of different requests; real "
        "pairs show how alike two random real images are.</p>" + table_html(["pairs", "MS-SSIM", "count"], rows)
    )


def _memorisation(report: dict[str, Any], run: FinishedRun, reference: TrainingSet, per_sample: pd.DataFrame) -> str:
    plt = pyplot()
    memo = report["memorisation"]
    parts = [
        "<h2>Memorisation</h2>",
        f"<p>{html.escape(memo['recipe'])}: tau = {memo['tau']:.4f} ({memo['training_images']} training, "
        f"{memo['held_out_images']} held-out images). Likely copies among accepted images: "
        f"{_with_interval(memo['rate'])}; in pixel space (thumbnail correlation, tau {memo['pixel_tau']:.4f}): "
        f"{_with_interval(memo['pixel_rate'])}.</p>",
        f'<p class="note">{html.escape(memo["note"])}</p>',
    ]
    accepted = per_sample[per_sample["decision"] == "accepted"]
    fig, ax = plt.subplots(figsize=(5, 2.6))
    similarity = accepted["nearest_similarity"].to_numpy()
    low = min(float(similarity.min()), memo["tau"]) - 1e-3 if len(similarity) else memo["tau"] - 1e-3
    ax.hist(similarity, bins=np.linspace(low, 1.0 + 1e-6, 31), color="tab:purple", alpha=0.7)
    ax.axvline(memo["tau"], color="red", linestyle="--", label="tau")
    ax.set_xlabel("cosine similarity to the nearest training image")
    ax.legend(fontsize=7)
    parts.append(
        figure_html(figure_uri(fig), "Nearest training similarity of each accepted image; right of tau: a likely copy.")
    )
    closest = memo["closest"]
    if closest:
        rows = per_sample.reset_index(drop=True)
        ids = dict(zip(reference.frame["image_id"], reference.frame["image_path"], strict=True))
        pairs = []
        for entry in closest:
            sample = rows.iloc[entry["sample"]]
            image_path = run.samples.loc[run.samples["sample_id"] == sample["sample_id"], "image_path"].iloc[0]
            nearest = ids.get(entry["nearest"])
            if nearest is not None:
                pairs.append((sample["sample_id"], run.path(image_path), reference.resolve(nearest), entry))
        if pairs:
            synthetic = _load([p[1] for p in pairs])
            training = _load([p[2] for p in pairs])
            fig, axes = plt.subplots(2, len(pairs), figsize=(1.4 * len(pairs), 3.3), squeeze=False)
            for c, (_, _, _, entry) in enumerate(pairs):
                for r, image in enumerate((synthetic[c], training[c])):
                    axes[r, c].imshow(image, cmap="gray", vmin=0, vmax=1)
                    axes[r, c].set_xticks([])
                    axes[r, c].set_yticks([])
                axes[0, c].set_title(f"{entry['similarity']:.3f}", fontsize=8)
                axes[1, c].set_xlabel(entry["nearest"][-14:], fontsize=6)
            parts.append(
                figure_html(
                    figure_uri(fig),
                    "The most similar synthetic images (top, with their similarity) beside their nearest training "
                    "image (bottom).",
                )
            )
    return "".join(parts)


def _utility(out: Path) -> str:
    path = out / UTILITY_FILE
    if not path.is_file():
        return (
            "<h2>Usefulness</h2><p>Not measured for this report: <code>xreal evaluate utility --real TRAIN "
            f"--synthetic RUN --test TEST --out {html.escape(str(out))}</code> trains a classifier three ways and "
            "adds its table here.</p>"
        )
    result = json.loads(path.read_text())
    regimes = result.get("regimes", {})
    labels = sorted({label for regime in regimes.values() for label in regime.get("labels", {})})
    rows = []
    for label in labels:
        row = [label]
        for regime in regimes.values():
            entry = regime.get("labels", {}).get(label) or {}
            row.append(_with_interval({"value": entry.get("auroc"), **{k: entry.get(k) for k in ("low", "high")}}))
        rows.append(row)
    rows.append(["mean", *[_fmt(regime.get("mean_auroc")) for regime in regimes.values()]])
    return (
        "<h2>Usefulness</h2><p>AUROC on held-out real images of a classifier trained three ways "
        "(see <code>utility.json</code> for the settings).</p>" + table_html(["label", *regimes], rows)
    )


def _provenance(report: dict[str, Any]) -> str:
    shown = {
        key: report[key] for key in ("run", "reference", "test", "judges", "settings", "software") if key in report
    }
    return "<h2>Provenance</h2><pre>" + html.escape(json.dumps(shown, indent=2)) + "</pre>"
