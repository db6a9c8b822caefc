"""The committed demo bundle: it loads by default, and it visibly does what the method promises."""

import numpy as np
import pytest

from xreal.core.labels import score_key
from xreal.core.settings import SPEEDS
from xreal.judges.judging import load_judges
from xreal.judges.phantom_judges import anatomy_dice
from xreal.model.bundle import DEMO_BUNDLE, read_bundle_record
from xreal.phantom import renderer as phantom

pytestmark = pytest.mark.slow
STEPS = dict(num_inference_steps=25, anatomy_steps=12)
FAST = SPEEDS["fast"].pipeline_arguments()
RECOVERED = 0.75  # the share of the room between random pairing and the ceiling that control must recover (issue 18)


@pytest.fixture(scope="module")
def generated(pipe):
    labels = ["Pleural Effusion", "Lung Lesion", "Consolidation", "Cardiomegaly"]
    seeds = [900 + i for i in range(len(labels))]
    healthy = [phantom.generate(1, 64, seed=s, pathologies=[[]])[0] for s in seeds]
    diseased = [phantom.generate(1, 64, seed=s, pathologies=[[lab]])[0] for s, lab in zip(seeds, labels, strict=True)]
    masks = [case.pathology_masks[lab] for case, lab in zip(diseased, labels, strict=True)]
    anatomy = np.stack([case.anatomy for case in healthy])
    out = pipe(anatomy, [[lab] for lab in labels], seeds, masks, **STEPS)
    return anatomy, masks, out


def test_bundle_is_small_safetensors_and_records_its_training():
    files = [p for p in DEMO_BUNDLE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20 * 2**20
    assert {p.suffix for p in files} <= {".json", ".safetensors", ".md"}
    record = read_bundle_record(DEMO_BUNDLE)
    assert record["preset"]["name"] == "demo" and "phantom" in record["training"]["data"]


def test_healthy_twins_follow_the_requested_anatomy_keep_the_lung_texture_and_no_finding(pipe):
    """Anatomy control recovers most of the room between random pairing and the segmenter's ceiling, the lungs keep
    the real phantoms' fine detail, the healthy twins show no finding, and two seeds of one anatomy are still not
    the Anatomy Controller's image pasted in.

    Measured by the bundle's judges (trained on phantoms apart from the diffusion model) on 16 held-out anatomies
    with the fast preset. Random pairing scores each generated image against another request's anatomy; the
    ceiling is the segmenter on the real phantoms. With the preset's 11 of 12 anatomy steps the judges call a
    finding on 2 of these 32 twins (1 of the 16 real phantoms); with the preset before it, 7 of 8 steps, on 19:
    its one free step, a jump from t = 124, drew haze and opacities. That freedom was also all that told two seeds
    apart: replicas at MS-SSIM 0.983 now against 0.959, and 0.999 when every step blends (the controller's image).
    The twins' lungs keep 0.76 of the real phantoms' high-frequency power (ribs, vessels); 0.47 before the decoder
    was fine-tuned with the texture term.
    """
    from xreal.evaluate.metrics import lung_detail_power, ms_ssim

    judges = load_judges(str(DEMO_BUNDLE / "judges"))
    n = 16
    healthy = phantom.generate(n, 64, seed=700, pathologies=[[]] * n)

    def mean_dice(requested, images) -> float:
        found = judges.segment(images)
        return float(
            np.mean([np.mean(list(anatomy_dice(a, f).values())) for a, f in zip(requested, found, strict=True)])
        )

    def twins(anatomy_steps: int, first_seed: int = 700) -> np.ndarray:
        settings = {**FAST, "anatomy_steps": anatomy_steps}
        seeds = list(range(first_seed, first_seed + n))
        return pipe(healthy.anatomy, [""] * n, seeds, None, **settings).healthy_images

    ceiling = mean_dice(healthy.anatomy, healthy.images)
    controlled, without = twins(FAST["anatomy_steps"]), twins(0)
    random_pairing = mean_dice(np.roll(healthy.anatomy, 1, axis=0), controlled)
    assert ceiling > 0.95 and random_pairing < 0.72
    assert (mean_dice(healthy.anatomy, controlled) - random_pairing) / (ceiling - random_pairing) >= RECOVERED
    assert mean_dice(healthy.anatomy, without) < random_pairing + 0.05  # without control: no better than chance
    generated_detail, real_detail = (lung_detail_power(x, healthy.anatomy).mean() for x in (controlled, healthy.images))
    assert 0.7 <= generated_detail / real_detail <= 1.3  # issue 18's texture goal
    replicas = twins(FAST["anatomy_steps"], first_seed=800)
    called = [
        max(v for key, v in row.items() if key.startswith("p_"))
        for row in judges.score(np.concatenate([controlled, replicas]))
    ]
    assert sum(p >= 0.5 for p in called) <= 5, sorted(called)  # 0.5: each label's operating point
    pasted = twins(FAST["num_inference_steps"]), twins(FAST["num_inference_steps"], first_seed=800)
    assert ms_ssim(controlled, replicas).mean() < 0.99 <= ms_ssim(*pasted).mean()


def test_thin_findings_keep_their_contrast_and_are_found(pipe):
    """Plates of atelectasis and nodules, a latent cell or two wide, are drawn at the real phantoms' contrast and
    the bundle's judges find them, with the fast preset, on 12 held-out requests.

    Contrast: the mean |final - twin| on the mask over the real phantom's |finding - twin|; a median of 1.09 here.
    Blended in through the mask blurred by half a cell (the placement before stop 30), the same draws kept 0.82
    (0.84 at guidance 7). The judges find 11 of the 12 either way, as they find 12 of the real ones.
    """
    judges = load_judges(str(DEMO_BUNDLE / "judges"))
    n = 12
    labels = ["Atelectasis", "Lung Lesion"] * (n // 2)
    cases = phantom.generate(n, 64, seed=310, pathologies=[[label] for label in labels])
    healthy = phantom.generate(n, 64, seed=310, pathologies=[[]] * n)
    masks = [cases.pathology_masks[label][i] for i, label in enumerate(labels)]
    out = pipe(
        healthy.anatomy,
        [[label] for label in labels],
        list(range(310, 310 + n)),
        masks,
        **SPEEDS["fast"].pipeline_arguments([[label] for label in labels]),
    )
    contrast = [
        np.abs(out.images[i] - out.healthy_images[i])[m].mean() / np.abs(cases.images[i] - healthy.images[i])[m].mean()
        for i, m in enumerate(masks)
    ]
    found = [row[score_key("p", label)] >= 0.5 for row, label in zip(judges.score(out.images), labels, strict=True)]
    assert np.median(contrast) > 0.95, np.round(contrast, 2)
    assert sum(found) >= 10, found


def test_pathology_appears_inside_its_mask_only(generated):
    _, masks, out = generated
    inside = []
    for mask, final, twin in zip(masks, out.images, out.healthy_images, strict=True):
        change = np.abs(final - twin)
        from scipy import ndimage

        near = ndimage.binary_dilation(mask, iterations=6)
        inside.append(change[mask].mean())
        assert change[mask].mean() > 0.01  # something was generated there
        assert change[~near].mean() < 0.2 * change[mask].mean()
    # Some draws stay faint (consolidation and nodules, in this bundle and the ones before it).
    assert np.mean(inside) > 0.03
