"""How much the phantom's anatomy varies, measured on its label maps, and how alike two random anatomies are.

Prints percentiles of each measure and the lung-and-heart Dice of random
pairs, and writes a figure (histograms and a sheet of outlines) for the README.
Every measure is taken from the rendered label maps, not from the renderer's
parameters, so it is what a segmenter or a manifest audit would see.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from xreal.core.labels import Anatomy
from xreal.judges.judging import anatomy_dice
from xreal.phantom import renderer as phantom
from xreal.phantom.anatomy import cardiothoracic_ratio


def measures(label_map: np.ndarray) -> dict[str, float]:
    """Cardiothoracic ratio, thorax width, lung heights, diaphragm height, lung balance, tilt and midline shift."""
    size = label_map.shape[0]
    right, left = label_map == Anatomy.RIGHT_LUNG, label_map == Anatomy.LEFT_LUNG
    rows_r, cols_r = np.nonzero(right)
    rows_l, cols_l = np.nonzero(left)
    thorax = np.nonzero((right | left | (label_map == Anatomy.HEART)).any(axis=0))[0]
    # The hemidiaphragm: the lowest lung row in the middle third of the right lung's columns.
    third = (cols_r >= np.percentile(cols_r, 33)) & (cols_r <= np.percentile(cols_r, 67))
    # The midline: halfway between the lungs' medial edges in the upper third of the chest.
    upper = int(rows_r.min() + (rows_r.max() - rows_r.min()) / 3)
    medial = (cols_r[rows_r == upper].max() + cols_l[rows_l == upper].min()) / 2 if (rows_l == upper).any() else np.nan
    centre = (thorax[0] + thorax[-1]) / 2
    return {
        "cardiothoracic ratio": cardiothoracic_ratio(label_map),
        "thorax width / image width": (thorax[-1] - thorax[0] + 1) / size,
        "right lung height / image height": (rows_r.max() - rows_r.min() + 1) / size,
        "right hemidiaphragm, from top / height": (rows_r[third].max() + 1) / size,
        "left / right lung area": left.sum() / right.sum(),
        "tilt of the lungs (degrees)": np.degrees(
            np.arctan2(rows_l.mean() - rows_r.mean(), cols_l.mean() - cols_r.mean())
        ),
        "midline shift / thorax width": (medial - centre) / (thorax[-1] - thorax[0] + 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=999)
    parser.add_argument("--out", type=Path, default=Path("xreal/bundles/phantom_anatomy.png"))
    args = parser.parse_args()

    n = args.count
    healthy = phantom.generate(n, 128, seed=args.seed, pathologies=[()] * n)
    enlarged = phantom.generate(n // 4, 128, seed=args.seed, pathologies=[["Cardiomegaly"]] * (n // 4))
    # A natural mix: a quarter of the chests have cardiomegaly.
    maps = np.concatenate([enlarged.anatomy, healthy.anatomy[n // 4 :]])
    rows = [measures(m) for m in maps]
    names = list(rows[0])
    print(f"{n} phantom anatomies (seed {args.seed}, a quarter with cardiomegaly), 128 px; percentiles 2/25/50/75/98")
    for name in names:
        values = np.array([r[name] for r in rows])
        print(f"  {name:46s} " + " ".join(f"{v:7.3f}" for v in np.nanpercentile(values, [2, 25, 50, 75, 98])))
    partner = np.roll(np.arange(n), 1)
    pairs = [anatomy_dice(maps[i], maps[partner[i]]) for i in range(n)]
    per = {k: np.mean([p[k] for p in pairs]) for k in pairs[0]}
    overall = np.mean([np.mean(list(p.values())) for p in pairs])
    print("random pairs, Dice: " + ", ".join(f"{k} {v:.3f}" for k, v in per.items()) + f"; mean {overall:.3f}")

    fig = plt.figure(figsize=(13, 5.6))
    grid = fig.add_gridspec(2, 6)
    for k, name in enumerate(names):
        ax = fig.add_subplot(grid[k // 4, k % 4])
        values = np.array([r[name] for r in rows])
        ax.hist(values[~np.isnan(values)], bins=30, color="#4c72b0")
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_yticks([])
    ax = fig.add_subplot(grid[:, 4:])
    colours = plt.get_cmap("tab10")
    for i in range(12):
        for structure, style in ((Anatomy.RIGHT_LUNG, "-"), (Anatomy.LEFT_LUNG, "-"), (Anatomy.HEART, ":")):
            ax.contour(maps[i] == structure, levels=[0.5], colors=[colours(i % 10)], linestyles=style, linewidths=0.8)
    ax.set_xlim(0, 128)
    ax.set_ylim(128, 0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"12 anatomies (lungs solid, heart dotted); random-pair Dice {overall:.2f}", fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
