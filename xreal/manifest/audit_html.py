"""The manifest audit, drawn: ``xreal manifest audit MANIFEST --html FILE``.

One self-contained HTML page that shows what a manifest asks for before a
GPU-hour is spent: where each label's pathology goes (a heatmap per label over
the mean requested anatomy), what the anatomies look like, their
cardiothoracic ratios, how many samples each label gets, and which requests
the audit's checks flag (:func:`xreal.manifest.audit.audit_manifest`), with why.

The manifest is streamed once more after the audit (:func:`collect_drawing`):

- the location heatmaps take every valid request: each adds its sample count
  to the pixels its pathology mask or boxes cover, on a ``size x size`` grid of
  the normalized image, so memory stays one grid per label whatever the
  manifest's length;
- anatomies are decoded for a seeded uniform random sample of at most
  ``sample_size`` requests (reservoir sampling, :data:`ANATOMY_SAMPLE` by
  default): the mean anatomy, the overlays and the cardiothoracic-ratio
  histogram are drawn from it, and the page says how large it was.
"""

from __future__ import annotations

import html
import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xreal.core.errors import XRealError
from xreal.core.figures import figure_html, figure_uri, page_html, pyplot, table_html
from xreal.core.files import atomic_path
from xreal.core.labels import CHEXPERT_LABELS, NO_FINDING, Anatomy
from xreal.core.masks import area_fraction, boxes_to_mask, resize_label_map
from xreal.manifest.audit import FILE_COLUMNS, NEAR_IDENTICAL_IOU, TEMPLATE_SIZE, AuditReport, audit_manifest
from xreal.manifest.schema import ManifestIssue, Request, iter_requests
from xreal.phantom.anatomy import cardiothoracic_ratio

HEATMAP_SIZE = 128  # side of the normalized grid the heatmaps and the mean anatomy are drawn on
ANATOMY_SAMPLE = 2000  # requests whose anatomy is decoded (seeded random sample)
OVERLAY_COUNT = 24  # distinct anatomies drawn over each other and in the grid
MAX_TABLE_ROWS = 300  # flagged requests listed on the page
MAX_ISSUES = 1000  # row problems kept while streaming
MASK_CACHE = 256  # pathology mask files kept (resized) while streaming
ENLARGED_CTR = 0.5  # the ratio above which the audit counts a heart as enlarged

# background, right lung (image left), left lung (image right), heart
ANATOMY_COLOURS = ("#000000", "#4f9bd9", "#6cc3a0", "#e0604f")


@dataclass
class MeasuredAnatomy:
    """One sampled request's anatomy: its cardiothoracic ratio (None when it could not be measured)."""

    request_id: str
    anatomy_key: str
    num_samples: int
    cardiothoracic_ratio: float | None
    problem: str | None = None


@dataclass
class AuditDrawing:
    """What the page draws, as arrays (``size x size`` grids over the normalized image, row 0 at the top)."""

    manifest: str
    size: int
    sample_size: int
    seed: int
    valid_requests: int = 0
    heatmaps: dict[str, np.ndarray] = field(default_factory=dict)  # label -> share of its samples per pixel
    label_samples: dict[str, int] = field(default_factory=dict)  # label -> samples requested (the denominator)
    label_requests: dict[str, int] = field(default_factory=dict)
    unlocated: dict[str, int] = field(default_factory=dict)  # label -> samples whose location could not be read
    anatomy_share: np.ndarray | None = None  # [4, size, size]: share of sampled samples with each anatomy id
    sampled_requests: int = 0  # requests in the anatomy sample
    sampled_samples: int = 0
    measured: list[MeasuredAnatomy] = field(default_factory=list)
    overlays: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (request id, label map at size)
    issues: list[ManifestIssue] = field(default_factory=list)
    issue_count: int = 0
    request_rows: dict[str, int] = field(default_factory=dict)  # request id -> row, for the flag table

    @property
    def ratios(self) -> np.ndarray:
        return np.array([m.cardiothoracic_ratio for m in self.measured if m.cardiothoracic_ratio is not None])

    @property
    def ratio_weights(self) -> np.ndarray:
        return np.array([m.num_samples for m in self.measured if m.cardiothoracic_ratio is not None], dtype=float)


def _label_location(request: Request, label: str, size: int, masks: dict[Path, np.ndarray]) -> np.ndarray:
    """Where ``label`` goes in ``request``, as the covered fraction of each pixel of the ``size`` grid.

    A pathology mask file locates every label of its row (read with the
    request's own reader, then area-resampled); boxes locate their own label,
    and an unlabelled box every label (rasterised like the generator does).
    """
    if request.pathology_mask_path is not None:
        path = request.pathology_mask_path
        if path not in masks:
            if len(masks) >= MASK_CACHE:
                masks.pop(next(iter(masks)))
            mask = request.pathology_mask(request.anatomy.shape or (size, size))
            masks[path] = area_fraction(mask, size)
        return masks[path]
    boxes = [coords for box_label, coords in request.normalized_boxes() if box_label in (None, label)]
    return boxes_to_mask(boxes, size, size, units="normalized").astype(np.float32)


def collect_drawing(
    path: str | os.PathLike[str],
    root: str | os.PathLike[str] | None = None,
    sample_size: int = ANATOMY_SAMPLE,
    seed: int = 0,
    size: int = HEATMAP_SIZE,
    rows_of: Collection[str] | None = None,
) -> AuditDrawing:
    """Stream a manifest into the arrays the page draws (see the module docstring).

    ``rows_of`` names the requests whose row numbers the flag table needs
    (None: every request's).
    """
    if sample_size < 1:
        raise XRealError(f"the anatomy sample must hold at least one request, got {sample_size}")
    drawing = AuditDrawing(manifest=str(path), size=size, sample_size=sample_size, seed=seed)
    sums: dict[str, np.ndarray] = {}
    masks: dict[Path, np.ndarray] = {}
    rng = np.random.default_rng(seed)
    reservoir: list[Request] = []
    seen = 0

    def valid_requests():
        for valid, issues in iter_requests(path, root):
            drawing.issue_count += len(issues)
            drawing.issues.extend(issues[: max(0, MAX_ISSUES - len(drawing.issues))])
            yield from valid

    for request in valid_requests():
        seen += 1
        if rows_of is None or request.request_id in rows_of:
            drawing.request_rows[request.request_id] = request.row
        for label in request.labels:
            drawing.label_samples[label] = drawing.label_samples.get(label, 0) + request.num_samples
            drawing.label_requests[label] = drawing.label_requests.get(label, 0) + 1
            if not request.has_pathology:
                continue
            try:
                location = _label_location(request, label, size, masks)
            except (XRealError, OSError):
                drawing.unlocated[label] = drawing.unlocated.get(label, 0) + request.num_samples
                continue
            if label not in sums:
                sums[label] = np.zeros((size, size), dtype=np.float64)
            sums[label] += request.num_samples * location
        # reservoir sampling (algorithm R): every request is equally likely to be in the anatomy sample
        if len(reservoir) < sample_size:
            reservoir.append(request)
        else:
            j = int(rng.integers(0, seen))
            if j < sample_size:
                reservoir[j] = request
    drawing.valid_requests = seen
    drawing.heatmaps = {
        label: (sums[label] / drawing.label_samples[label]).astype(np.float32)
        for label in CHEXPERT_LABELS
        if label in sums
    }
    _measure_sample(drawing, sorted(reservoir, key=lambda r: r.row))
    return drawing


def _measure_sample(drawing: AuditDrawing, sample: list[Request]) -> None:
    """Decode the sampled anatomies: mean anatomy, overlays, cardiothoracic ratios (the audit's measure)."""
    size = drawing.size
    share = np.zeros((len(Anatomy), size, size), dtype=np.float64)
    weight = 0
    decoded: dict[str, tuple[np.ndarray, float | None, str | None] | str] = {}
    for request in sample:
        key = request.anatomy.key
        if key not in decoded:
            try:
                label_map = request.anatomy_map(TEMPLATE_SIZE)
            except (XRealError, OSError) as exc:
                decoded[key] = f"anatomy could not be read: {exc}"
            else:
                try:
                    ratio, problem = cardiothoracic_ratio(label_map), None
                except XRealError as exc:
                    ratio, problem = None, str(exc)
                decoded[key] = (resize_label_map(label_map, size), ratio, problem)
                if len(drawing.overlays) < OVERLAY_COUNT:
                    drawing.overlays.append((request.request_id, decoded[key][0]))
        entry = decoded[key]
        if isinstance(entry, str):
            drawing.measured.append(MeasuredAnatomy(request.request_id, key, request.num_samples, None, entry))
            continue
        grid, ratio, problem = entry
        drawing.measured.append(MeasuredAnatomy(request.request_id, key, request.num_samples, ratio, problem))
        for anatomy in Anatomy:
            share[anatomy] += request.num_samples * (grid == anatomy)
        weight += request.num_samples
    drawing.sampled_requests = len(sample)
    drawing.sampled_samples = sum(r.num_samples for r in sample)
    drawing.anatomy_share = (share / weight).astype(np.float32) if weight else None


# --- figures -------------------------------------------------------------------------


def _anatomy_backdrop(ax, share: np.ndarray | None) -> None:
    """The mean anatomy in grey: lungs light, heart darker."""
    if share is not None:
        lungs = share[Anatomy.RIGHT_LUNG] + share[Anatomy.LEFT_LUNG]
        ax.imshow(1.0 - 0.2 * lungs - 0.42 * share[Anatomy.HEART], cmap="gray", vmin=0.0, vmax=1.0)


def _anatomy_outlines(ax, share: np.ndarray | None) -> None:
    """Where at least half of the sampled anatomies have lung (solid) or heart (dashed)."""
    if share is None:
        return
    lungs = share[Anatomy.RIGHT_LUNG] + share[Anatomy.LEFT_LUNG]
    heart = share[Anatomy.HEART]
    if lungs.max() >= 0.5:
        ax.contour(lungs, levels=[0.5], colors="#1f4e79", linewidths=1.1)
    if heart.max() >= 0.5:
        ax.contour(heart, levels=[0.5], colors="#111111", linewidths=1.1, linestyles="dashed")


def _heatmap_figure(label: str, heat: np.ndarray, share: np.ndarray | None) -> str:
    from matplotlib.ticker import PercentFormatter

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(3.4, 3.1))
    _anatomy_backdrop(ax, share)
    shown = np.ma.masked_less_equal(heat, 0.0)
    peak = float(heat.max()) if heat.max() > 0 else 1.0  # each panel to its own peak: diffuse labels stay visible
    image = ax.imshow(shown, cmap="YlOrRd", vmin=0.0, vmax=peak, alpha=0.75, interpolation="nearest")
    _anatomy_outlines(ax, share)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03, format=PercentFormatter(1.0, decimals=0))
    bar.set_label("share of the label's samples", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    ax.set_title(label, fontsize=10)
    ax.text(0.0, 1.02, "R", transform=ax.transAxes, va="bottom", fontsize=8, color="#555")  # patient's right
    ax.set_xticks([])
    ax.set_yticks([])
    return figure_uri(fig)


def _overlay_figure(overlays: list[tuple[str, np.ndarray]]) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.6))
    size = overlays[0][1].shape[0]
    ax.imshow(np.ones((size, size)), cmap="gray", vmin=0.0, vmax=1.0)
    alpha = max(0.25, min(0.9, 4.0 / len(overlays)))
    for _, label_map in overlays:
        lungs = ((label_map == Anatomy.RIGHT_LUNG) | (label_map == Anatomy.LEFT_LUNG)).astype(float)
        heart = (label_map == Anatomy.HEART).astype(float)
        for part, colour in ((lungs, ANATOMY_COLOURS[1]), (heart, ANATOMY_COLOURS[3])):
            if part.any() and not part.all():
                ax.contour(part, levels=[0.5], colors=colour, linewidths=0.9, alpha=alpha)
    ax.plot([], [], color=ANATOMY_COLOURS[1], label="lungs")
    ax.plot([], [], color=ANATOMY_COLOURS[3], label="heart")
    ax.legend(loc="lower center", fontsize=8, ncol=2, frameon=False, bbox_to_anchor=(0.5, -0.08))
    ax.set_title(f"{len(overlays)} anatomies, outlines overlaid", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    return figure_uri(fig)


def _grid_figure(overlays: list[tuple[str, np.ndarray]]) -> str:
    from matplotlib.colors import ListedColormap

    plt = pyplot()
    columns = min(6, len(overlays))
    rows = -(-len(overlays) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.75 * rows), squeeze=False)
    cmap = ListedColormap(ANATOMY_COLOURS)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (request_id, label_map) in zip(axes.ravel(), overlays, strict=False):
        ax.imshow(label_map, cmap=cmap, vmin=0, vmax=len(ANATOMY_COLOURS) - 1, interpolation="nearest")
        ax.set_title(request_id if len(request_id) <= 22 else request_id[:21] + "…", fontsize=7)
    fig.tight_layout()
    return figure_uri(fig)


def _ratio_figure(ratios: np.ndarray, weights: np.ndarray) -> str:
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.2))
    low, high = min(0.25, float(ratios.min()) - 0.02), max(0.75, float(ratios.max()) + 0.02)
    ax.hist(ratios, bins=np.linspace(low, high, 41), weights=weights, color="#4f7fb0", edgecolor="white")
    ax.axvline(ENLARGED_CTR, color="#c03030", linestyle="--", linewidth=1.2)
    ax.text(ENLARGED_CTR, ax.get_ylim()[1] * 0.97, " enlarged heart >", color="#c03030", va="top", fontsize=8)
    ax.set_xlabel("cardiothoracic ratio (heart width / thorax width)")
    ax.set_ylabel("requested samples")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.spines[["top", "right"]].set_visible(False)
    return figure_uri(fig)


def _label_figure(per_label: dict[str, dict[str, int]]) -> str:
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    labels = list(per_label)
    samples = [per_label[label]["samples"] for label in labels]
    fig, ax = plt.subplots(figsize=(6.4, 0.35 * len(labels) + 0.9))
    colours = ["#7a9a5a" if label == NO_FINDING else "#4f7fb0" for label in labels]
    bars = ax.barh(labels, samples, color=colours)
    ax.invert_yaxis()
    for bar, label in zip(bars, labels, strict=True):
        requests = per_label[label]["requests"]
        ax.text(
            bar.get_width(),
            bar.get_y() + bar.get_height() / 2,
            f" {bar.get_width():,.0f} ({requests:,} request{'s' if requests != 1 else ''})",
            va="center",
            fontsize=8,
        )
    ax.set_xlim(0, max(samples) * 1.3)
    ax.set_xlabel("requested samples")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(axis="y", labelsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    return figure_uri(fig)


# --- the page ------------------------------------------------------------------------


def flagged_requests(report: AuditReport, drawing: AuditDrawing) -> list[tuple[str, str, int | None, str]]:
    """``(check, request(s), row, why)`` for every request the audit's checks flag."""
    rows: list[tuple[str, str, int | None, str]] = []
    at = drawing.request_rows.get
    for issue in drawing.issues:
        check = "unresolved file" if issue.column in FILE_COLUMNS else "invalid row"
        why = f"column {issue.column!r}: {issue.reason}" if issue.column else issue.reason
        rows.append((check, issue.request_id or "–", issue.row, why + " (left out of every figure)"))
    for ids in report.duplicates:
        for other in ids[1:]:
            rows.append(
                (
                    "duplicate",
                    other,
                    at(other),
                    f"same anatomy, labels, location, overrides and seed as {ids[0]!r}: the same request twice",
                )
            )
    for pair in report.near_identical:
        a, b = pair["requests"]
        rows.append(
            (
                "near-identical",
                b,
                at(b),
                f"same anatomy and labels as {a!r}, pathology location IoU {pair['location_iou']} "
                f"(>= {NEAR_IDENTICAL_IOU}): little new variety",
            )
        )
    for request_id in report.locations_outside_thorax:
        rows.append(
            (
                "location outside thorax",
                request_id,
                at(request_id),
                "less than half of its pathology mask or boxes lies on the lungs or heart of its anatomy",
            )
        )
    listed = {str(issue) for issue in drawing.issues}
    for text in report.unresolved_files:  # the rest are anatomies the audit could not decode
        if text not in listed and not text.startswith("row "):
            rows.append(("unreadable anatomy", text.split(":", 1)[0].removeprefix("request "), None, text))
    noted = {r[1] for r in rows}
    for m in drawing.measured:
        if m.problem is not None and m.request_id not in noted:
            rows.append(("unreadable anatomy", m.request_id, at(m.request_id), m.problem))
    return rows


def _section(title: str, *parts: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{''.join(parts)}</section>"


def _p(text: str, cls: str | None = None) -> str:
    return f'<p class="{cls}">{html.escape(text)}</p>' if cls else f"<p>{html.escape(text)}</p>"


def _panels(figures: Iterable[str]) -> str:
    return '<div style="display:flex;flex-wrap:wrap;gap:0 1.2rem">' + "".join(figures) + "</div>"


def audit_page(report: AuditReport, drawing: AuditDrawing) -> str:
    """The whole HTML page for an audit and its drawing."""
    sections = [_summary_section(report, drawing)]
    sections.append(_heatmap_section(drawing))
    sections.append(_anatomy_section(drawing))
    sections.append(_ratio_section(drawing))
    sections.append(_label_section(report))
    sections.append(_flag_section(report, drawing))
    return page_html(f"Manifest audit: {Path(report.manifest).name}", sections)


def _sample_sentence(drawing: AuditDrawing) -> str:
    if drawing.sampled_requests == drawing.valid_requests:
        return f"all {drawing.valid_requests:,} valid requests ({drawing.sampled_samples:,} samples)"
    return (
        f"a random sample of {drawing.sampled_requests:,} of the {drawing.valid_requests:,} valid requests "
        f"({drawing.sampled_samples:,} samples; at most {drawing.sample_size:,} requests are decoded, "
        f"drawn uniformly with seed {drawing.seed})"
    )


def _summary_section(report: AuditReport, drawing: AuditDrawing) -> str:
    totals = [
        ("manifest", report.manifest),
        ("rows", f"{report.rows:,}"),
        ("valid rows (drawn)", f"{report.valid_rows:,}"),
        ("rows with problems (not drawn)", f"{report.issue_count:,}"),
        ("samples requested", f"{report.samples:,}"),
        ("UNet evaluations", f"{report.unet_evaluations:,}"),
        ("distinct anatomies", f"{report.unique_anatomies:,}"),
        (
            "pathology requests with a healthy twin",
            f"{report.pathology_requests_with_healthy_twin:,} of "
            f"{report.valid_rows - report.per_label.get(NO_FINDING, {}).get('requests', 0):,}",
        ),
    ]
    return _section(
        "Summary",
        table_html(["", "value"], totals),
        _p(
            f"Location heatmaps use every valid request. Anatomy figures (mean anatomy, overlays, "
            f"cardiothoracic ratios) use {_sample_sentence(drawing)}.",
            "note",
        ),
        _p("Images are drawn as they will be generated: the patient's right (R) on the image's left."),
    )


def _heatmap_section(drawing: AuditDrawing) -> str:
    if not drawing.heatmaps:
        return _section("Where the pathologies go", _p("No valid pathology request: nothing to locate."))
    panels = []
    for label, heat in drawing.heatmaps.items():
        samples, requests = drawing.label_samples[label], drawing.label_requests[label]
        caption = (
            f"{label}: {samples:,} samples in {requests:,} request{'s' if requests != 1 else ''}; "
            f"at most {heat.max():.0%} of them cover one pixel"
        )
        if drawing.unlocated.get(label):
            caption += f"; {drawing.unlocated[label]:,} samples' locations could not be read"
        panels.append(
            figure_html(_heatmap_figure(label, heat, drawing.anatomy_share), caption, alt=f"heatmap: {label}")
        )
    how = (
        "How to read: one panel per requested pathology label. Colour is the share of that label's requested "
        "samples whose pathology mask or box covers the pixel (a labelled box counts for its own label, an "
        "unlabelled box or a mask for every label of its row): 100% means every sample of the label is placed "
        "there, no colour means none. Each panel's colours run up to its own peak (its colour bar gives the "
        "shares), so a label spread thinly over the chest stays visible. Under it, the mean requested anatomy "
        "in grey (lungs light, heart darker) with outlines where at least half of the sampled anatomies have "
        "lung (solid blue) or heart (dashed black). "
        "Pathology far from the outlines, or a label squeezed into one spot, shows up here before generation."
    )
    if drawing.label_samples.get(NO_FINDING):
        how += f" No Finding ({drawing.label_samples[NO_FINDING]:,} samples) has no location and no panel."
    return _section("Where the pathologies go", _p(how), _panels(panels))


def _anatomy_section(drawing: AuditDrawing) -> str:
    if not drawing.overlays:
        reason = "No anatomy could be decoded" if drawing.valid_requests else "No valid request"
        return _section("Anatomies", _p(f"{reason}: nothing to draw."))
    overlay_caption = (
        f"How to read: the outlines of {len(drawing.overlays)} distinct anatomies from the sample, each resized to "
        f"{drawing.size}x{drawing.size} and drawn over the others (lungs blue, heart red). A tight bundle means "
        "similar anatomies; a stray outline is an unusual (or wrongly oriented) anatomy."
    )
    grid_caption = (
        "How to read: the same anatomies one by one, titled by the first request that uses them "
        "(black background, blue right lung on the image's left, green left lung, red heart)."
    )
    return _section(
        "Anatomies",
        _p(f"From {_sample_sentence(drawing)}."),
        _panels(
            [
                figure_html(_overlay_figure(drawing.overlays), overlay_caption, alt="anatomy outlines overlaid"),
                figure_html(_grid_figure(drawing.overlays), grid_caption, alt="anatomy grid"),
            ]
        ),
    )


def _ratio_section(drawing: AuditDrawing) -> str:
    ratios, weights = drawing.ratios, drawing.ratio_weights
    if not ratios.size:
        reason = "No anatomy could be measured" if drawing.valid_requests else "No valid request"
        return _section("Cardiothoracic ratio", _p(f"{reason}: nothing to draw."))
    enlarged = float(weights[ratios > ENLARGED_CTR].sum() / weights.sum())
    caption = (
        f"How to read: the cardiothoracic ratio (widest extent of the heart over that of the lungs and heart, "
        f"as the audit measures it) of each sampled request's anatomy, counted once per requested sample. "
        f"Right of the dashed line ({ENLARGED_CTR}) the heart is enlarged: {enlarged:.0%} of the sampled "
        f"samples. Median {float(np.median(ratios)):.3f} over {ratios.size:,} requests from "
        f"{_sample_sentence(drawing)}. A Cardiomegaly label on a small heart, or healthy requests on "
        "enlarged ones, contradicts itself."
    )
    return _section(
        "Cardiothoracic ratio",
        figure_html(_ratio_figure(ratios, weights), caption, alt="cardiothoracic ratio histogram"),
    )


def _label_section(report: AuditReport) -> str:
    if not report.per_label:
        return _section("Samples per label", _p("No valid request."))
    caption = (
        "How to read: requested samples per label (bars, with the number of requests); a sample with several "
        "labels counts under each. No Finding in green. Short bars are the labels the dataset will be thin on."
    )
    combos = table_html(
        ["label combination", "requests", "samples"],
        [(c["labels"], f"{c['requests']:,}", f"{c['samples']:,}") for c in report.per_combination[:30]],
    )
    return _section(
        "Samples per label", figure_html(_label_figure(report.per_label), caption, alt="samples per label"), combos
    )


def _flag_section(report: AuditReport, drawing: AuditDrawing) -> str:
    rows = flagged_requests(report, drawing)
    if not rows:
        return _section("Flagged requests", _p("The audit's checks flag no request.", "note"))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row[0]] = counts.get(row[0], 0) + 1
    parts = [table_html(["check", "flagged"], sorted(counts.items(), key=lambda kv: -kv[1]))]
    if drawing.issue_count > len(drawing.issues):
        parts.append(
            _p(
                f"{drawing.issue_count:,} row problems in all, {len(drawing.issues):,} kept here; "
                "run `xreal manifest validate` for every one.",
                "warn",
            )
        )
    parts.append(table_html(["check", "request", "row", "why"], rows[:MAX_TABLE_ROWS]))
    if len(rows) > MAX_TABLE_ROWS:
        parts.append(_p(f"… and {len(rows) - MAX_TABLE_ROWS:,} more (see `xreal manifest audit --json`)."))
    return _section("Flagged requests", *parts)


def write_audit_html(
    manifest_path: str | os.PathLike[str],
    out_html: str | os.PathLike[str],
    root: str | os.PathLike[str] | None = None,
    report: AuditReport | None = None,
    sample_size: int = ANATOMY_SAMPLE,
    seed: int = 0,
) -> Path:
    """Write the drawn audit of a manifest to ``out_html`` (atomically); returns its path.

    ``report`` is the manifest's :func:`audit_manifest` result when the
    caller has it already (the CLI prints it too); otherwise it is computed.
    """
    if report is None:
        report = audit_manifest(manifest_path, root)
    flagged = {i for ids in report.duplicates for i in ids} | set(report.locations_outside_thorax)
    flagged |= {i for pair in report.near_identical for i in pair["requests"]}
    drawing = collect_drawing(manifest_path, root, sample_size=sample_size, seed=seed, rows_of=flagged)
    page = audit_page(report, drawing)
    with atomic_path(out_html) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return Path(out_html)
