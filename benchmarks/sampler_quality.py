"""Fast sampling at matched quality: each sampler and step count against the reference settings, on phantoms.

For every setting it generates the same manifest (phantoms of ``--phantom-seed``,
21 by default, never used to train or tune the demo model; choose a setting on
one seed and confirm it on another: `xreal manifest from-index`, every label
the same number of times, a few No Finding) with one round and every draw kept
(`--keep-rejected`), then evaluates it with `xreal evaluate` against the demo
model's training phantoms (seed 11) and held-out phantoms (seed 12). It prints:

- UNet evaluations per draw and per accepted image (samples.parquet's
  ``unet_evaluations`` over the accepted count), and how many times fewer than
  the reference settings (DDIM 100 + 100, eta 1, guidance 7);
- accepted images per hour, as a ratio to the reference settings: seconds per
  image to sample and judge one batch of pathology requests, every setting
  timed in turn, interleaved, in this one run (median of the passes), times
  the setting's acceptance rate;
- the control and fidelity figures with their bootstrap 95% intervals: anatomy
  Dice (every draw), the share of change inside the requested mask (every
  draw), the requested label's hit rate (every pathology draw), Fréchet
  distance (accepted images) and the acceptance rate;
- of the accepted images, the share in which a classifier trained apart from the
  judges (control_phantom's, at 95% specificity on other real phantoms) calls a
  finding nobody asked for, and the UNet evaluations per clean image (accepted
  without one);
- whether each figure holds: not worse than the reference settings beyond their
  interval (Dice, inside mask and hit rate at least the reference's lower bound;
  Fréchet distance at most its upper bound); and the cheapest setting, per clean
  image, that holds them all.

Runs and reports are kept under --work; a rerun reuses finished runs (delete
the folder to start again). The demo preset on this CPU takes about 40 minutes.

    python benchmarks/sampler_quality.py                    # every setting
    python benchmarks/sampler_quality.py --only dpmsolver++-10 unipc-10   # and the baseline, ddim-100
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from control_phantom import called, classifier_thresholds, unasked
from control_phantom import judges as independent_judges

from xreal.core.labels import NO_FINDING
from xreal.core.settings import DEFAULT_SETTINGS, SPEEDS, SamplerSettings
from xreal.evaluate import metrics
from xreal.evaluate.inputs import image_batches
from xreal.evaluate.report import evaluate_run
from xreal.phantom import renderer as phantom

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Setting:
    name: str
    settings: SamplerSettings

    @property
    def options(self) -> tuple[str, ...]:
        """xreal generate's sampler options for these settings."""
        x = self.settings
        interval = [f"{v:g}" for v in x.guidance_interval]
        return (
            "--sampler", x.sampler, "--steps", str(x.steps), "--anatomy-steps", str(x.anatomy_steps),
            "--step-grid", x.step_grid, "--guidance-interval", *interval, "--guidance-scale", f"{x.guidance_scale:g}",
            "--healthy-guidance", f"{x.healthy_guidance_scale:g}",
            *(f"--finding-guidance={label}={scale:g}" for label, scale in x.finding_guidance),
        )  # fmt: skip


def _setting(name: str, sampler: str, steps: int, **options) -> Setting:
    return Setting(
        name, DEFAULT_SETTINGS.with_overrides(sampler=sampler, steps=steps, anatomy_steps=steps // 2, **options)
    )


SETTINGS = [
    Setting("ddim-100", DEFAULT_SETTINGS),  # the reference settings: DDIM 100 + 100, eta 1, guidance 7
    _setting("ddim-20", "ddim", 20),
    _setting("ddim-10", "ddim", 10),
    _setting("dpmsolver++-20", "dpmsolver++", 20),
    _setting("dpmsolver++-10", "dpmsolver++", 10),
    _setting("dpmsolver++-10-half-guided", "dpmsolver++", 10, guidance_interval=(0.0, 0.5)),
    _setting("dpmsolver++-8", "dpmsolver++", 8),
    _setting("dpmsolver++-8-late-guided", "dpmsolver++", 8, guidance_interval=(0.25, 1.0)),
    _setting("dpmsolver++-6", "dpmsolver++", 6),
    _setting("dpmsolver++-sde-10", "dpmsolver++-sde", 10),
    _setting("unipc-10", "unipc", 10),
    _setting("unipc-8", "unipc", 8),
    Setting("fast", SPEEDS["fast"]),
    Setting("dpmsolver++-8-anatomy-7", SPEEDS["fast"].with_overrides(steps=8, anatomy_steps=7)),  # fast until stop 29
    Setting("dpmsolver++-16-anatomy-14", SPEEDS["fast"].with_overrides(steps=16, anatomy_steps=14)),
]
# (report path, higher is better) of the figures that must hold
FIGURES = {
    "anatomy Dice": (("control", "all_draws", "anatomy_dice"), True),
    "inside mask": (("control", "all_draws", "inside_mask"), True),
    "hit rate": (None, True),  # pooled over every pathology draw, from per_sample.parquet
    "Fréchet distance": (("fidelity", "synthetic", "frechet"), False),
}


def xreal(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "xreal.cli", *args], check=True, cwd=ROOT)


def prepare(work: Path, per_label: int, healthy: int, seed: int) -> tuple[Path, Path]:
    phantoms, manifest, policy = work / "phantoms", work / "manifest.parquet", work / "policy.yaml"
    if not (phantoms / "index.parquet").is_file():
        xreal("phantom", "--count", "600", "--size", "64", "--seed", str(seed), "--out", str(phantoms), "--overwrite")
    if not manifest.is_file():
        xreal(
            "manifest", "from-index", str(phantoms), "--out", str(manifest), "--per-label", str(per_label),
            "--healthy", str(healthy), "--seed", str(seed),
        )  # fmt: skip
    policy.write_text("retries:\n  max_rounds: 1\n")  # one draw per image asked: per-draw figures are plain
    return manifest, policy


def generate(setting: Setting, manifest: Path, policy: Path, out: Path, batch_size: int) -> None:
    if (out / "dataset.json").is_file():
        return  # finished in an earlier run of this script
    options = ["--policy", str(policy), "--keep-rejected", "--batch-size", str(batch_size), "--quiet"]
    xreal("generate", str(manifest), "--out", str(out), *options, *setting.options)


def hit_rate(report_dir: Path) -> dict:
    table = pd.read_parquet(report_dir / "per_sample.parquet")
    scores = table.loc[table["labels"].map(lambda labels: list(labels) != [NO_FINDING]), "requested_label_score"]
    hits = (scores.to_numpy(dtype=float) >= 0.5).astype(float)
    low, high = metrics.mean_interval(hits)
    return {"value": float(hits.mean()), "low": low, "high": high, "n": int(hits.size)}


def figure(report: dict, report_dir: Path, name: str) -> dict:
    path, _ = FIGURES[name]
    if path is None:
        return hit_rate(report_dir)
    entry = report
    for key in path:
        entry = entry[key]
    return entry


def unasked_on_accepted(samples: pd.DataFrame, run: Path, independent) -> np.ndarray:
    """Per accepted image: whether control_phantom's classifier, trained apart from the judges (95% specificity on
    other real phantoms), calls a finding that was not asked for, which the gate let through."""
    kept = samples[samples["decision"] == "accepted"]
    if kept.empty:
        return np.zeros(0, bool)
    images = next(image_batches([run / p for p in kept["image_path"]], len(kept)))
    return unasked(called(*independent, images), [list(labels) for labels in kept["labels"]])


def measure(
    setting: Setting, run: Path, report_dir: Path, reference: Path, test: Path, cache: dict, independent
) -> dict:
    record = json.loads((run / "dataset.json").read_text())
    samples = pd.read_parquet(run / "samples.parquet")
    accepted = int((samples["decision"] == "accepted").sum())
    started = time.perf_counter()
    report = evaluate_run(run, reference, report_dir, test=test, progress=False, html=False, reference_cache=cache)
    wrong = unasked_on_accepted(samples, run, independent).astype(float)
    clean = accepted - int(wrong.sum())
    low, high = metrics.mean_interval(wrong) if len(wrong) else (None, None)
    return {
        "setting": setting.name,
        "options": " ".join(setting.options),
        "sampler": record["sampler_defaults"],
        "draws": len(samples),
        "accepted": accepted,
        "unet_per_draw": float(samples["unet_evaluations"].mean()),
        "unet_per_accepted": float(samples["unet_evaluations"].sum() / max(accepted, 1)),
        "unasked": {"value": float(wrong.mean()) if len(wrong) else None, "low": low, "high": high},
        "unet_per_clean": float(samples["unet_evaluations"].sum() / max(clean, 1)),
        "figures": {name: figure(report, report_dir, name) for name in FIGURES},
        "evaluate_s": round(time.perf_counter() - started, 1),
    }


def time_side_by_side(settings: list[Setting], batch: int, repeats: int) -> dict[str, float]:
    """Seconds per image to sample and judge one batch of pathology requests (phantoms of seed 31, every label),
    each setting in turn, interleaved ``repeats`` times; the median of each."""
    import torch

    from xreal.judges.judging import load_judges
    from xreal.model.bundle import DEMO_BUNDLE, load_pipeline
    from xreal.phantom import renderer as phantom

    pipe = load_pipeline(DEMO_BUNDLE)
    pipe.set_progress_bar_config(disable=True)
    judges = load_judges(str(DEMO_BUNDLE / "judges"))
    findings = phantom.PHANTOM_PATHOLOGIES
    cases = phantom.generate(batch, 64, seed=31, pathologies=[[findings[i % len(findings)]] for i in range(batch)])
    anatomy, masks = list(cases.anatomy), [c.pathology_masks[c.labels[0]] for c in cases]
    prompts, seeds = [list(c.labels) for c in cases], list(range(batch))
    maps = np.stack([pipe.conditioning_anatomy(a) for a in anatomy])
    seconds: dict[str, list[float]] = {s.name: [] for s in settings}
    for _ in range(repeats):
        for setting in settings:
            x = setting.settings
            started = time.perf_counter()
            with torch.no_grad():
                out = pipe(
                    anatomy,
                    prompts,
                    seeds,
                    masks,
                    **x.pipeline_arguments(),
                )
                judges.score(out.images, maps, masks)
            seconds[setting.name].append((time.perf_counter() - started) / batch)
    return {name: float(np.median(values)) for name, values in seconds.items()}


def holds(entry: dict, reference: dict, higher_is_better: bool) -> bool:
    if entry.get("value") is None or reference.get("low") is None:
        return False
    return entry["value"] >= reference["low"] if higher_is_better else entry["value"] <= reference["high"]


def fmt(entry: dict) -> str:
    if entry.get("value") is None:
        return "-"
    if entry.get("low") is None:
        return f"{entry['value']:.3f}"
    return f"{entry['value']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def table(results: list[dict]) -> str:
    base = results[0]
    names = list(FIGURES)
    header = [
        "setting", "UNet/draw", "UNet/accepted", "x fewer", "accepted", "accepted/h ratio", "unasked finding",
        "UNet/clean", *names, "holds",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        verdicts = [holds(r["figures"][n], base["figures"][n], FIGURES[n][1]) for n in names]
        r["holds"] = dict(zip(names, verdicts, strict=True))
        cells = [
            r["setting"],
            f"{r['unet_per_draw']:.0f}",
            f"{r['unet_per_accepted']:.1f}",
            f"{base['unet_per_accepted'] / r['unet_per_accepted']:.1f}x",
            f"{r['accepted']}/{r['draws']}",
            f"{r['accepted_per_hour'] / base['accepted_per_hour']:.1f}x" if "accepted_per_hour" in r else "-",
            fmt(r["unasked"]),
            f"{r['unet_per_clean']:.1f}",
            *[fmt(r["figures"][n]) + ("" if v else " (worse)") for n, v in zip(names, verdicts, strict=True)],
            "yes" if all(verdicts) else "no: " + ", ".join(n for n, v in zip(names, verdicts, strict=True) if not v),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "sampler-quality")
    parser.add_argument("--reference", type=Path, default=ROOT / "build" / "demo-phantom")
    parser.add_argument("--test", type=Path, default=ROOT / "build" / "held-out-phantom")
    parser.add_argument("--phantom-seed", type=int, default=21, help="seed of the requests' phantoms (not 11 or 12)")
    parser.add_argument("--per-label", type=int, default=7, help="requests of each of the seven pathologies")
    parser.add_argument("--healthy", type=int, default=7, help="No Finding requests")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--only", nargs="+", default=None, help="these settings (and the baseline)")
    parser.add_argument("--cache", type=Path, default=ROOT / "build" / "phantom-judges", help="control_phantom's cache")
    parser.add_argument("--baseline", default="ddim-100", help="the setting the others are compared with")
    parser.add_argument("--timing-batch", type=int, default=4, help="pathology requests per timed batch")
    parser.add_argument("--timing-repeats", type=int, default=2, help="interleaved timed passes (median); 0: no timing")
    args = parser.parse_args()
    for folder, seed, count in ((args.reference, 11, 3000), (args.test, 12, 500)):
        if not (folder / "index.parquet").is_file():
            xreal("phantom", "--count", str(count), "--size", "64", "--seed", str(seed), "--out", str(folder))

    args.work.mkdir(parents=True, exist_ok=True)
    manifest, policy = prepare(args.work, args.per_label, args.healthy, args.phantom_seed)
    chosen = [s for s in SETTINGS if s.name == args.baseline]
    chosen += [s for s in SETTINGS if s.name != args.baseline and (args.only is None or s.name in args.only)]
    cache: dict = {}
    classifier = independent_judges(args.cache, 64).classifier
    independent = (classifier, classifier_thresholds(classifier, phantom.generate(600, 64, seed=args.phantom_seed + 2)))
    results = []
    for setting in chosen:
        run, report_dir = args.work / "runs" / setting.name, args.work / "reports" / setting.name
        started = time.perf_counter()
        generate(setting, manifest, policy, run, args.batch_size)
        result = measure(setting, run, report_dir, args.reference, args.test, cache, independent)
        results.append(result)
        print(f"{setting.name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

    per_image = time_side_by_side(chosen, args.timing_batch, args.timing_repeats) if args.timing_repeats else {}
    for r in results if per_image else []:
        r["seconds_per_image"] = per_image[r["setting"]]
        r["accepted_per_hour"] = 3600 / per_image[r["setting"]] * r["accepted"] / r["draws"]
    text = table(results)
    matching = [r for r in results[1:] if all(r["holds"].values())]
    fastest = min(matching, key=lambda r: r["unet_per_clean"]) if matching else None
    base = results[0]
    print(
        f"demo preset, {len(results)} settings, {base['draws']} draws each; reference settings: DDIM "
        f"{DEFAULT_SETTINGS.steps} + {DEFAULT_SETTINGS.steps}, eta {DEFAULT_SETTINGS.eta}, guidance "
        f"{DEFAULT_SETTINGS.guidance_scale}; fast preset: {SPEEDS['fast'].to_dict()}"
    )
    print(text)
    if fastest:
        print(
            f"\ncheapest setting whose figures hold, per clean image (accepted, and no unasked finding): "
            f"{fastest['setting']} ({fastest['options']}), {base['unet_per_clean'] / fastest['unet_per_clean']:.1f}x "
            "fewer UNet evaluations per clean image than the reference settings"
        )
    else:
        print("\nno setting holds every figure of the reference settings")
    (args.work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (args.work / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
