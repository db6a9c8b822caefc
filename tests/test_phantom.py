"""The procedural phantom: determinism, validation, ground-truth consistency and rendering physics."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from scipy import ndimage

from xreal.core.errors import XRealError
from xreal.core.labels import ANATOMY_IDS, CHEXPERT_LABELS, NO_FINDING, Anatomy
from xreal.judges.judging import anatomy_dice
from xreal.phantom import renderer as phantom
from xreal.phantom.anatomy import cardiothoracic_ratio
from xreal.phantom.renderer import PHANTOM_PATHOLOGIES, generate

LUNG_PATHOLOGIES = [lab for lab in PHANTOM_PATHOLOGIES if lab != "Cardiomegaly"]
LUNG_IDS = {"right": Anatomy.RIGHT_LUNG, "left": Anatomy.LEFT_LUNG}


def assert_same_case(a: phantom.PhantomCase, b: phantom.PhantomCase) -> None:
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.anatomy, b.anatomy)
    assert a.pathology_masks.keys() == b.pathology_masks.keys()
    for lab, mask in a.pathology_masks.items():
        assert np.array_equal(mask, b.pathology_masks[lab])
    assert (a.labels, a.finding, a.boxes, a.seed, a.index) == (b.labels, b.finding, b.boxes, b.seed, b.index)


@pytest.fixture(scope="module")
def mixed() -> phantom.PhantomBatch:
    """Freely drawn cases, mostly diseased."""
    return generate(240, 64, seed=5, healthy_fraction=0.15)


@pytest.fixture(scope="module")
def healthy_twins() -> phantom.PhantomBatch:
    return generate(24, 64, seed=9, pathologies=[[]] * 24)


@pytest.fixture(scope="module")
def single() -> dict[str, phantom.PhantomBatch]:
    """For every pathology, the 24 healthy twins rendered with only that pathology."""
    return {lab: generate(24, 64, seed=9, pathologies=[[lab]] * 24) for lab in PHANTOM_PATHOLOGIES}


# --- determinism ---------------------------------------------------------------------------------


def test_same_seed_gives_identical_batches():
    a, b = generate(6, 96, seed=3), generate(6, 96, seed=3)
    for i in range(6):
        assert_same_case(a[i], b[i])


@pytest.mark.parametrize("size", [64, 97])
def test_sample_depends_only_on_seed_and_index(size):
    whole = generate(10, size, seed=3)
    part = generate(3, size, seed=3, start=7)
    for k in range(3):
        assert_same_case(whole[7 + k], part[k])
    assert part.indices.tolist() == [7, 8, 9]


def test_internal_chunking_does_not_change_samples(monkeypatch):
    whole = generate(9, 80, seed=4)
    monkeypatch.setattr(phantom, "_CHUNK_PIXELS", 2 * 80 * 80)
    chunked = generate(9, 80, seed=4)
    for i in range(9):
        assert_same_case(whole[i], chunked[i])
    for lab in PHANTOM_PATHOLOGIES:
        assert np.array_equal(whole.pathology_masks[lab], chunked.pathology_masks[lab])


def test_forced_pathologies_keep_the_sample_stream():
    drawn = generate(30, 64, seed=2)
    forced = generate(30, 64, seed=2, pathologies=[case.labels for case in drawn])
    for i in range(30):
        assert_same_case(drawn[i], forced[i])


def test_different_seeds_and_indices_differ():
    a, b = generate(4, 64, seed=0), generate(4, 64, seed=1)
    for i in range(4):
        assert not np.array_equal(a.anatomy[i], b.anatomy[i])
        assert np.abs(a.images[i] - b.images[i]).mean() > 0.01
    assert not np.array_equal(a.anatomy[0], a.anatomy[1])


# --- arguments -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [63, 513, 0, -64, 64.0, True])
def test_size_outside_range_is_rejected(size):
    with pytest.raises(XRealError, match=re.escape(repr(size))):
        generate(1, size)


def test_empty_request():
    batch = generate(0, 64, seed=1)
    assert len(batch) == 0 and batch.images.shape == (0, 64, 64) and batch.labels == []


def test_extreme_sizes_work():
    for size, count in ((64, 3), (512, 2)):
        batch = generate(count, size, seed=1)
        assert batch.images.shape == (count, size, size)


@pytest.mark.parametrize(
    "kwargs",
    [{"count": -1}, {"seed": -2}, {"start": -1}, {"healthy_fraction": 1.5}, {"healthy_fraction": "half"}],
)
def test_bad_arguments_are_rejected(kwargs):
    args = {"count": 2, **kwargs}
    with pytest.raises(XRealError):
        generate(**args)


def test_forced_pathologies_are_respected():
    sets = [
        ["pleural effusion"],
        ["EDEMA", "Lung_Lesion"],
        [],
        [NO_FINDING],
        ["cardiomegaly", "pneumothorax"],
    ]
    batch = generate(5, 64, seed=0, pathologies=sets)
    assert batch.labels == [
        ("Pleural Effusion",),
        ("Lung Lesion", "Edema"),
        (NO_FINDING,),
        (NO_FINDING,),
        ("Cardiomegaly", "Pneumothorax"),
    ]


@pytest.mark.parametrize("bad", [["Fracture"], ["Pleural Efusion"], ["No Finding", "Edema"]])
def test_unsupported_labels_are_rejected_naming_the_supported_ones(bad):
    with pytest.raises(XRealError, match=r"Pneumothorax.*Consolidation"):
        generate(1, 64, pathologies=[bad])


def test_pathologies_must_match_count():
    with pytest.raises(XRealError, match="one label set per case"):
        generate(2, 64, pathologies=[["Edema"]])
    with pytest.raises(XRealError, match="string"):
        generate(1, 64, pathologies=["Edema"])


def test_healthy_fraction_extremes():
    assert all(lab == (NO_FINDING,) for lab in generate(20, 64, healthy_fraction=1.0).labels)
    drawn = generate(40, 64, healthy_fraction=0.0).labels
    assert all(NO_FINDING not in lab and 1 <= len(lab) <= 3 for lab in drawn)


def test_free_draws_mix_healthy_and_every_pathology(mixed):
    healthy = sum(lab == (NO_FINDING,) for lab in mixed.labels) / len(mixed)
    assert 0.05 < healthy < 0.3
    for lab in PHANTOM_PATHOLOGIES:
        assert any(lab in labels for labels in mixed.labels)
    assert any(len(labels) >= 2 for labels in mixed.labels)


# --- arrays and label maps ---------------------------------------------------------------------------


def test_arrays_have_documented_types(mixed):
    n = len(mixed)
    assert mixed.images.dtype == np.float32 and mixed.images.shape == (n, 64, 64)
    assert mixed.images.min() >= 0.0 and mixed.images.max() <= 1.0
    assert mixed.anatomy.dtype == np.uint8 and mixed.anatomy.shape == (n, 64, 64)
    assert set(np.unique(mixed.anatomy).tolist()) == ANATOMY_IDS
    assert set(mixed.pathology_masks) == set(PHANTOM_PATHOLOGIES)
    for mask in mixed.pathology_masks.values():
        assert mask.dtype == bool and mask.shape == (n, 64, 64)
    assert mixed.indices.dtype == np.int64 and mixed.indices.tolist() == list(range(n))
    assert len(mixed.labels) == len(mixed.findings) == len(mixed.boxes) == n


def test_batch_indexing(mixed):
    last = mixed[-1]
    assert last.index == len(mixed) - 1 and last.seed == 5
    assert np.array_equal(last.image, mixed.images[-1])
    assert len(list(mixed)) == len(mixed)
    with pytest.raises(IndexError):
        mixed[len(mixed)]


def test_image_looks_like_a_radiograph(mixed):
    """Air outside the body dark, lungs darker than the abdomen, spine brighter than the lungs."""
    for i in range(0, len(mixed), 20):
        image, anatomy = mixed.images[i], mixed.anatomy[i]
        lungs = (anatomy == Anatomy.RIGHT_LUNG) | (anatomy == Anatomy.LEFT_LUNG)
        assert image[:4, :4].mean() < 0.15 and image[:4, -4:].mean() < 0.15
        assert image[-8:, 28:36].mean() > image[lungs].mean() + 0.25
        assert image[24:36, 31:33].mean() > image[lungs].mean() + 0.2


def test_right_lung_is_on_the_image_left_and_heart_right_of_centre(mixed):
    cols = np.arange(64)
    smaller_left, heart_offsets = 0, []
    for i in range(len(mixed)):
        anatomy = mixed.anatomy[i]
        right = cols[(anatomy == Anatomy.RIGHT_LUNG).any(axis=0)]
        left = cols[(anatomy == Anatomy.LEFT_LUNG).any(axis=0)]
        assert right.max() < left.min()
        heart_offsets.append(np.nonzero(anatomy == Anatomy.HEART)[1].mean() - (right.max() + left.min()) / 2)
        smaller_left += (anatomy == Anatomy.LEFT_LUNG).sum() < (anatomy == Anatomy.RIGHT_LUNG).sum()
    # Mediastinal shift can centre a heart, never put it on the patient's right.
    assert min(heart_offsets) > -1.0 and np.mean(heart_offsets) > 1.5
    assert smaller_left > 0.75 * len(mixed)


def test_anatomy_varies_between_samples(mixed):
    areas = np.array([(mixed.anatomy[i] == Anatomy.RIGHT_LUNG).sum() for i in range(len(mixed))])
    ratios = np.array([cardiothoracic_ratio(a) for a in mixed.anatomy])
    assert areas.std() / areas.mean() > 0.15
    assert ratios.max() - ratios.min() > 0.2


def test_anatomies_differ_as_much_as_real_chests():
    """Pairing each anatomy with a random other one scores lung-and-heart Dice at most 0.70 (it was 0.82),
    and healthy and enlarged hearts together span cardiothoracic ratios from about 0.35 to 0.65."""
    n = 200
    healthy = generate(n, 64, seed=31, pathologies=[()] * n)
    enlarged = generate(n, 64, seed=31, pathologies=[["Cardiomegaly"]] * n)
    partner = np.random.default_rng(0).permutation(n)
    pairs = [anatomy_dice(healthy.anatomy[i], healthy.anatomy[partner[i]]) for i in range(n) if partner[i] != i]
    assert np.mean([np.mean(list(d.values())) for d in pairs]) <= 0.70
    ratios = [cardiothoracic_ratio(a) for a in np.concatenate([healthy.anatomy, enlarged.anatomy])]
    assert np.percentile(ratios, 2) < 0.37 and np.percentile(ratios, 98) > 0.63


def test_anatomy_is_the_same_at_every_size():
    small = phantom.anatomy_template(8, 64)
    large = phantom.anatomy_template(8, 256)
    assert (large[1::4, 1::4] == small).mean() > 0.95


# --- cardiothoracic ratio ---------------------------------------------------------------------------


def test_cardiomegaly_ratio_is_above_half_and_healthy_below():
    n = 80
    big = generate(n, 64, seed=21, pathologies=[["Cardiomegaly"]] * n)
    normal = generate(n, 64, seed=21, pathologies=[["Edema", "Lung Lesion"]] * n)
    for i in range(n):
        assert 0.5 < cardiothoracic_ratio(big.anatomy[i]) < 0.75
        assert 0.3 < cardiothoracic_ratio(normal.anatomy[i]) < 0.5
        assert np.array_equal(big.pathology_masks["Cardiomegaly"][i], big.anatomy[i] == Anatomy.HEART)
        assert f"{cardiothoracic_ratio(big.anatomy[i]):.2f}" in big.findings[i]


def test_cardiothoracic_ratio_of_a_hand_made_map():
    anatomy = np.zeros((10, 20), np.uint8)
    anatomy[2:8, 2:9] = Anatomy.RIGHT_LUNG
    anatomy[2:8, 11:18] = Anatomy.LEFT_LUNG
    anatomy[5:8, 7:15] = Anatomy.HEART
    anatomy[6, 6] = Anatomy.HEART
    assert cardiothoracic_ratio(anatomy) == pytest.approx(9 / 16)


@pytest.mark.parametrize("remove", [Anatomy.HEART, "lungs"])
def test_cardiothoracic_ratio_needs_heart_and_lungs(remove):
    anatomy = phantom.anatomy_template(0, 64).copy()
    if remove == "lungs":
        anatomy[anatomy != Anatomy.HEART] = Anatomy.BACKGROUND
    else:
        anatomy[anatomy == remove] = Anatomy.BACKGROUND
    with pytest.raises(XRealError):
        cardiothoracic_ratio(anatomy)
    with pytest.raises(XRealError):
        cardiothoracic_ratio(np.zeros((2, 8, 8), np.uint8))


# --- ground truth ------------------------------------------------------------------------------------


def test_labels_masks_boxes_and_findings_agree(mixed):
    for i in range(len(mixed)):
        case = mixed[i]
        lungs = (case.anatomy == Anatomy.RIGHT_LUNG) | (case.anatomy == Anatomy.LEFT_LUNG)
        rendered = [lab for lab in PHANTOM_PATHOLOGIES if mixed.pathology_masks[lab][i].any()]
        present = [lab for lab in case.labels if lab != NO_FINDING]
        assert sorted(rendered) == sorted(present)
        assert list(case.labels) == [lab for lab in CHEXPERT_LABELS if lab in case.labels]
        assert set(case.pathology_masks) == set(present)
        if not present:
            assert case.labels == (NO_FINDING,)
            assert case.finding == phantom.HEALTHY_FINDING and case.boxes == ()
            continue
        assert case.finding != phantom.HEALTHY_FINDING
        expected = []
        for lab in present:
            mask = case.pathology_masks[lab]
            if lab == "Cardiomegaly":
                parts = [mask]
            else:
                assert not (mask & ~lungs).any(), f"{lab} outside the lungs in case {i}"
                parts = [mask & (case.anatomy == lung) for lung in (Anatomy.RIGHT_LUNG, Anatomy.LEFT_LUNG)]
            for part in parts:
                if part.any():
                    rows, cols = np.nonzero(part)
                    expected.append((lab, cols.min(), rows.min(), cols.max() + 1, rows.max() + 1))
        assert list(case.boxes) == expected


def test_pathology_masks_are_never_empty_even_small(mixed):
    for lab in PHANTOM_PATHOLOGIES:
        sizes = [mixed.pathology_masks[lab][i].sum() for i in range(len(mixed)) if lab in mixed.labels[i]]
        assert min(sizes) >= 4, lab


def test_unilateral_findings_name_the_side_of_their_mask(single):
    for lab in ("Pneumothorax", "Consolidation", "Lung Lesion", "Atelectasis"):
        batch = single[lab]
        for i in range(len(batch)):
            sides = [
                side
                for side, lung in LUNG_IDS.items()
                if (batch[i].pathology_masks[lab] & (batch.anatomy[i] == lung)).any()
            ]
            assert len(sides) == 1 and f" {sides[0]} " in batch.findings[i]
            assert len(batch.boxes[i]) == 1


def test_effusion_fills_the_base_of_its_lung(single):
    batch = single["Pleural Effusion"]
    for i in range(len(batch)):
        mask, anatomy = batch.pathology_masks["Pleural Effusion"][i], batch.anatomy[i]
        for side, lung in LUNG_IDS.items():
            part = mask & (anatomy == lung)
            if not part.any():
                assert f"{side} pleural" not in batch.findings[i]
                continue
            lung_rows = np.nonzero((anatomy == lung).any(axis=1))[0]
            rows = np.nonzero(part.any(axis=1))[0]
            assert rows.min() > lung_rows.min() + 0.5 * (lung_rows.max() - lung_rows.min())
            assert rows.max() == lung_rows.max()
            assert side in batch.findings[i] or "bilateral" in batch.findings[i]


def test_edema_is_bilateral_and_perihilar(single):
    batch = single["Edema"]
    for i in range(len(batch)):
        mask, anatomy = batch.pathology_masks["Edema"][i], batch.anatomy[i]
        assert (mask & (anatomy == Anatomy.RIGHT_LUNG)).any() and (mask & (anatomy == Anatomy.LEFT_LUNG)).any()
        lung_cols = np.nonzero((anatomy == Anatomy.RIGHT_LUNG).any(axis=0))[0]
        assert not mask[:, lung_cols.min()].any()


def test_lesion_size_in_image_widths():
    batch = generate(30, 256, seed=13, pathologies=[["Lung Lesion"]] * 30)
    radii = [np.sqrt(m.sum() / np.pi) / 256 for m in batch.pathology_masks["Lung Lesion"]]
    assert min(radii) > 0.015 and max(radii) < 0.085


def test_consolidation_nodule_and_plate_are_told_apart_by_their_shape():
    # A consolidation drawn as small as a nodule, or a nodule as large as a consolidation, is a label no
    # classifier can learn: before issue 18 every false consolidation call carried a nodule and vice versa.
    n = 200
    areas = {
        lab: generate(n, 64, seed=31, pathologies=[[lab]] * n).pathology_masks[lab]
        for lab in ("Consolidation", "Lung Lesion", "Atelectasis")
    }
    consolidation, nodule = areas["Consolidation"].sum(axis=(1, 2)), areas["Lung Lesion"].sum(axis=(1, 2))
    assert (consolidation > nodule.max()).mean() >= 0.95
    assert np.median(consolidation) >= 4 * np.median(nodule)

    def elongation(mask: np.ndarray) -> float:
        rows, cols = np.nonzero(mask)
        small, large = np.linalg.eigvalsh(np.cov(np.stack([cols, rows])))
        return float(np.sqrt(large / max(small, 1e-6)))

    plates = [elongation(m) for m in areas["Atelectasis"]]
    nodules = [elongation(m) for m in areas["Lung Lesion"] if m.sum() >= 5]
    assert min(plates) > max(nodules)


def test_consolidation_carries_air_bronchograms():
    # The bronchi stay lucent inside the opacity: along each drawn bronchus the consolidation adds less density
    # than beside it, at the same distances from the patch's centre.
    n, size = 12, 128
    ill = generate(n, size, seed=41, pathologies=[["Consolidation"]] * n)
    twins = generate(n, size, seed=41, pathologies=[[]] * n)
    lucent = 0
    for i in range(n):
        draw = phantom._draw_sample(41, i, size, ("Consolidation",), 0.0)
        spec = draw.specs["Consolidation"]
        steps = np.linspace(0.15, 0.5, 8) * float(spec["rx"])
        profiles = []
        for turn in (0.0, 0.5, -0.5):
            angles = [float(spec["br1"]) + turn, float(spec["br2"]) - turn]
            u = np.concatenate([float(spec["cu"]) + steps * np.cos(a) for a in angles])
            v = np.concatenate([float(spec["cv"]) + steps * np.sin(a) for a in angles])
            x, y = phantom._image_coordinates(draw.geo, u, v)
            diff = ill.images[i] - twins.images[i]
            profiles.append(ndimage.map_coordinates(diff, [y * size - 0.5, x * size - 0.5], order=1).mean())
        lucent += profiles[0] < min(profiles[1:])
    assert lucent >= n - 2


def test_pathologies_leave_the_anatomy_alone_except_cardiomegaly(single, healthy_twins):
    for lab in LUNG_PATHOLOGIES:
        assert np.array_equal(single[lab].anatomy, healthy_twins.anatomy), lab
    big = single["Cardiomegaly"].anatomy == Anatomy.HEART
    assert (big.sum(axis=(1, 2)) > (healthy_twins.anatomy == Anatomy.HEART).sum(axis=(1, 2))).all()


def test_anatomy_template_is_the_healthy_draw():
    for seed in (0, 17):
        template = phantom.anatomy_template(seed, 96)
        assert template.dtype == np.uint8 and template.shape == (96, 96)
        assert np.array_equal(template, generate(1, 96, seed, pathologies=[[]]).anatomy[0])
        assert np.array_equal(template, generate(1, 96, seed, pathologies=[["Edema", "Atelectasis"]]).anatomy[0])
        enlarged = generate(1, 96, seed, pathologies=[["Cardiomegaly"]]).anatomy[0]
        assert cardiothoracic_ratio(enlarged) > 0.5 > cardiothoracic_ratio(template)


def test_a_templates_finding_mask_is_where_the_phantom_draws_those_findings():
    from xreal.core.errors import MaskError
    from xreal.phantom.templates import template_finding_mask

    both = generate(1, 64, 8, pathologies=[["Cardiomegaly", "Pleural Effusion"]])[0]
    mask = template_finding_mask("phantom-8", ["Pleural Effusion", "cardiomegaly"], 64)  # any order, any case
    assert mask.dtype == bool
    assert np.array_equal(mask, both.pathology_masks["Cardiomegaly"] | both.pathology_masks["Pleural Effusion"])
    alone = template_finding_mask("phantom-8", ["Pleural Effusion"], 64)
    assert alone.sum() < mask.sum() and not (alone & ~mask).any()
    with pytest.raises(MaskError, match="no finding to locate"):
        template_finding_mask("phantom-8", ["No Finding"], 64)
    with pytest.raises(MaskError, match="unknown anatomy template 'heart-8'"):
        template_finding_mask("heart-8", ["Cardiomegaly"], 64)


# --- rendering physics --------------------------------------------------------------------------------


@pytest.mark.parametrize("lab", ["Pleural Effusion", "Consolidation", "Lung Lesion", "Atelectasis", "Edema"])
def test_opacities_brighten_their_mask_and_little_else(single, healthy_twins, lab):
    batch = single[lab]
    for i in range(len(batch)):
        mask = batch.pathology_masks[lab][i]
        diff = batch.images[i] - healthy_twins.images[i]
        assert diff[mask].mean() > 0.07, f"{lab} case {i} barely visible"
        if lab != "Edema":
            near = ndimage.binary_dilation(mask, iterations=2)
            assert np.abs(diff[~near]).max() < 0.02, f"{lab} case {i} rendered outside its mask"


def test_pneumothorax_rim_is_darker_and_the_pleural_line_brighter(single, healthy_twins):
    batch = single["Pneumothorax"]
    for i in range(len(batch)):
        rim, anatomy = batch.pathology_masks["Pneumothorax"][i], batch.anatomy[i]
        lung = anatomy == anatomy[rim][0]
        edge = ndimage.binary_dilation(rim) & lung & ~rim
        assert batch.images[i][rim].mean() < healthy_twins.images[i][rim].mean() - 0.05
        assert batch.images[i][edge].mean() > healthy_twins.images[i][edge].mean() + 0.01
        assert not (rim & ~lung).any()


def test_cardiomegaly_whitens_the_enlarged_heart(single, healthy_twins):
    batch = single["Cardiomegaly"]
    gains = []
    for i in range(len(batch)):
        grown = (batch.anatomy[i] == Anatomy.HEART) & (healthy_twins.anatomy[i] != Anatomy.HEART)
        gains.append(batch.images[i][grown].mean() - healthy_twins.images[i][grown].mean())
    assert min(gains) > 0.05 and np.mean(gains) > 0.1


def test_thousand_small_images_are_fast():
    started = time.perf_counter()
    generate(1000, 64, seed=1)
    assert time.perf_counter() - started < 20.0
