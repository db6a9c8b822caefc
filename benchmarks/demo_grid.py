"""Render the README's picture of the demo model: one row per phantom pathology.

Columns: the requested anatomy (right lung red, left lung green, heart blue),
the requested pathology mask over it, the real phantom of that request (what
the model should draw), the stage-1 healthy twin, and the final image.
Anatomies are held-out phantom templates; sampling uses the fast preset unless
``--sampler``/``--steps`` say otherwise. Usage:
``python benchmarks/demo_grid.py [--model DIR] [--out PNG]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from xreal.core.settings import SPEEDS
from xreal.model.bundle import load_pipeline
from xreal.phantom import renderer as phantom

FAST = SPEEDS["fast"]
COLOURS = np.array([[0, 0, 0], [200, 60, 60], [60, 180, 60], [70, 110, 230]], dtype=np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("xreal/bundles/demo_grid.png"))
    parser.add_argument("--sampler", default=FAST.sampler)
    parser.add_argument("--steps", type=int, default=FAST.steps)
    parser.add_argument("--scale", type=int, default=3, help="pixel repeat factor for viewing")
    args = parser.parse_args()
    pipe = load_pipeline(args.model)
    size = pipe.config.image_size
    labels = list(phantom.PHANTOM_PATHOLOGIES)
    seeds = [500 + i for i in range(len(labels))]
    healthy = [phantom.generate(1, size, seed=s, pathologies=[[]])[0] for s in seeds]
    diseased = [phantom.generate(1, size, seed=s, pathologies=[[lab]])[0] for s, lab in zip(seeds, labels, strict=True)]
    masks = [case.pathology_masks[lab] for case, lab in zip(diseased, labels, strict=True)]
    out = pipe(
        [c.anatomy for c in healthy],
        [[lab] for lab in labels],
        seeds,
        masks,
        **FAST.with_overrides(
            steps=args.steps, anatomy_steps=FAST.anatomy_steps_for(args.steps), sampler=args.sampler
        ).pipeline_arguments([[lab] for lab in labels]),
    )
    rows = []
    for i in range(len(labels)):
        anatomy = COLOURS[healthy[i].anatomy]
        overlay = anatomy.copy()
        overlay[masks[i]] = (0.4 * overlay[masks[i]] + 0.6 * np.array([255, 230, 0])).astype(np.uint8)
        grey = lambda x: np.repeat((np.clip(x, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)  # noqa: E731
        columns = [anatomy, overlay, grey(diseased[i].image), grey(out.healthy_images[i]), grey(out.images[i])]
        rows.append(np.concatenate(columns, axis=1))
    grid = np.concatenate(rows, axis=0).repeat(args.scale, 0).repeat(args.scale, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(args.out)
    print(f"wrote {args.out}: rows {', '.join(labels)}; columns anatomy, mask, real phantom, healthy twin, final")


if __name__ == "__main__":
    main()
