"""Procedural chest radiographs with exact ground truth.

Sample ``i`` of the stream ``seed`` is drawn from generators seeded with
``[seed, i, stream]`` (stream 0 picks the pathologies, 1 the anatomy, 2 the
texture and noise, 10 + k the parameters of pathology k), so it never depends
on the request size, start or chunking, and a healthy twin shares its anatomy
and noise with every diseased version. Geometry lives in normalised image
coordinates (x right, y down, both in [0, 1]); images follow the radiological
convention, so the patient's right lung is on the image's left.

Anatomy varies about as much as real chests do: lung height and width,
diaphragm height, asymmetric lungs, mediastinal shift, cardiothoracic ratios
from about 0.35 to 0.65, and the patient's pose on the detector (in-plane
rotation, magnification, centring). Everything is drawn in the body's own frame;
each pixel is mapped into that frame before the shapes are evaluated.

The picture is an attenuation sum (soft tissue, bone, heart, minus lung air,
plus pathology density) mapped through ``1 - exp(-k A)``, blurred a little and
overlaid with noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import ndimage

from xreal.core.errors import LabelError, XRealError
from xreal.core.labels import NO_FINDING, Anatomy, canonical_labels
from xreal.core.masks import mask_box
from xreal.phantom.anatomy import cardiothoracic_ratio

PHANTOM_PATHOLOGIES: tuple[str, ...] = (
    "Cardiomegaly",
    "Pleural Effusion",
    "Pneumothorax",
    "Consolidation",
    "Lung Lesion",
    "Atelectasis",
    "Edema",
)

MIN_SIZE = 64
MAX_SIZE = 512
HEALTHY_FINDING = "No acute cardiopulmonary abnormality."
HEALTHY_CTR_RANGE = (0.36, 0.47)
CARDIOMEGALY_CTR_RANGE = (0.54, 0.66)

Box = tuple[str, int, int, int, int]

_CHUNK_PIXELS = 1 << 21
_RIGHT, _LEFT = 0, 1
_PREFIX = ("r_", "l_")
_SIDE_NAMES = ("right", "left")
_TEXTURE_GRID = 24
_PATCH_GRID = 12
_TREE_ROOTS = 7
_TREE_DEPTH = 4
_VESSEL_SIGMA = (0.0055, 0.003)
_KAPPA = 1.25
_BLUR = 0.0028
# Oedema's mask: where its haze reaches this fraction of its peak. It holds 73% of the haze (0.4 held 54%, and
# stage 2, which draws only on the mask, cut the rest off); lower reaches the lungs' outer edge.
_EDEMA_MASK_FRACTION = 0.25

# A params mapping holds float32 scalars for one sample, or (n, 1, 1) float32 arrays for a batch.
Params = Mapping[str, Any]


@dataclass(frozen=True)
class PhantomCase:
    """One phantom radiograph and its ground truth."""

    image: np.ndarray
    anatomy: np.ndarray
    pathology_masks: dict[str, np.ndarray]
    labels: tuple[str, ...]
    finding: str
    boxes: tuple[Box, ...]
    seed: int
    index: int


@dataclass
class PhantomBatch:
    """``N`` phantom radiographs; ``pathology_masks`` holds every phantom pathology."""

    images: np.ndarray
    anatomy: np.ndarray
    pathology_masks: dict[str, np.ndarray]
    labels: list[tuple[str, ...]]
    findings: list[str]
    boxes: list[tuple[Box, ...]]
    seed: int
    indices: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> PhantomCase:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"phantom batch index {i} out of range for {n} cases")
        i %= n
        labels = self.labels[i]
        return PhantomCase(
            image=self.images[i],
            anatomy=self.anatomy[i],
            pathology_masks={lab: self.pathology_masks[lab][i] for lab in labels if lab != NO_FINDING},
            labels=labels,
            finding=self.findings[i],
            boxes=self.boxes[i],
            seed=self.seed,
            index=int(self.indices[i]),
        )

    def __iter__(self) -> Iterator[PhantomCase]:
        return (self[i] for i in range(len(self)))


# --- public functions ----------------------------------------------------------


def generate(
    count: int,
    size: int = 64,
    seed: int = 0,
    *,
    start: int = 0,
    pathologies: Sequence[Sequence[str]] | None = None,
    healthy_fraction: float = 0.3,
) -> PhantomBatch:
    """Samples start..start+count-1 of the phantom stream for `seed`."""
    _check_int("count", count, 0)
    _check_int("seed", seed, 0)
    _check_int("start", start, 0)
    _check_size(size)
    if not isinstance(healthy_fraction, int | float) or not 0.0 <= healthy_fraction <= 1.0:
        raise XRealError(f"healthy_fraction must lie in [0, 1], got {healthy_fraction!r}")
    forced = None if pathologies is None else _parse_pathologies(pathologies, count)

    per_chunk = max(1, _CHUNK_PIXELS // (size * size))
    images = np.empty((count, size, size), np.float32)
    anatomy = np.empty((count, size, size), np.uint8)
    masks = {lab: np.zeros((count, size, size), bool) for lab in PHANTOM_PATHOLOGIES}
    labels: list[tuple[str, ...]] = []
    findings: list[str] = []
    boxes: list[tuple[Box, ...]] = []
    for lo in range(0, count, per_chunk):
        hi = min(count, lo + per_chunk)
        draws = [
            _draw_sample(seed, start + k, size, None if forced is None else forced[k], healthy_fraction)
            for k in range(lo, hi)
        ]
        chunk_images, chunk_anatomy, chunk_masks = _render(draws, size)
        images[lo:hi] = chunk_images
        anatomy[lo:hi] = chunk_anatomy
        for lab, mask in chunk_masks.items():
            masks[lab][lo:hi] = mask
        for k, draw in enumerate(draws):
            case_masks = {lab: chunk_masks[lab][k] for lab in draw.present}
            labels.append(canonical_labels(draw.present))
            findings.append(_finding(draw, chunk_anatomy[k]))
            boxes.append(_boxes(case_masks, chunk_anatomy[k]))
    return PhantomBatch(
        images=images,
        anatomy=anatomy,
        pathology_masks=masks,
        labels=labels,
        findings=findings,
        boxes=boxes,
        seed=int(seed),
        indices=np.arange(start, start + count, dtype=np.int64),
    )


def anatomy_template(seed: int, size: int = 64) -> np.ndarray:
    """The healthy anatomy label map (uint8, Anatomy ids) of built-in template `seed`.

    It is the anatomy of sample 0 of stream `seed` drawn without pathologies.
    """
    return generate(1, size, seed, pathologies=[()]).anatomy[0]


# --- argument checks -------------------------------------------------------------


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise XRealError(f"{name} must be a whole number >= {minimum}, got {value!r}")


def _check_size(size: object) -> None:
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or not MIN_SIZE <= size <= MAX_SIZE:
        raise XRealError(f"phantom size must be a whole number of pixels in {MIN_SIZE}..{MAX_SIZE}, got {size!r}")


def _parse_pathologies(pathologies: Sequence[Sequence[str]], count: int) -> list[tuple[str, ...]]:
    if isinstance(pathologies, str) or len(pathologies) != count:
        got = "a string" if isinstance(pathologies, str) else f"{len(pathologies)} entries"
        raise XRealError(f"pathologies must hold one label set per case ({count}), got {got}")
    parsed = []
    for entry in pathologies:
        if isinstance(entry, str):
            raise XRealError(f"each pathologies entry must be a sequence of labels, got the string {entry!r}")
        supported = f"the phantom renders: {', '.join(PHANTOM_PATHOLOGIES)}"
        try:
            found = [lab for lab in canonical_labels(entry) if lab != NO_FINDING]
        except LabelError as exc:
            raise LabelError(f"{exc}; {supported}") from None
        unsupported = [lab for lab in found if lab not in PHANTOM_PATHOLOGIES]
        if unsupported:
            raise LabelError(f"the phantom cannot render {', '.join(map(repr, unsupported))}; {supported}")
        parsed.append(tuple(lab for lab in PHANTOM_PATHOLOGIES if lab in found))
    return parsed


# --- per-sample draws ----------------------------------------------------------------


@dataclass
class _Draw:
    """Everything one sample needs, drawn from its own generators."""

    present: tuple[str, ...]
    geo: dict[str, np.float32]
    specs: dict[str, dict[str, np.float32]]
    fields: dict[str, np.ndarray]
    vessels: np.ndarray
    texture: np.ndarray
    noise: np.ndarray


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, stream])


def _f32(values: Mapping[str, float]) -> dict[str, np.float32]:
    return {key: np.float32(val) for key, val in values.items()}


def _draw_sample(seed: int, index: int, size: int, forced: tuple[str, ...] | None, healthy_fraction: float) -> _Draw:
    present = _choose_pathologies(seed, index, healthy_fraction) if forced is None else forced
    geo = _f32(_draw_anatomy(_rng(seed, index, 1), "Cardiomegaly" in present, size))
    tex_rng = _rng(seed, index, 2)
    vessels = _splat_vessels(_draw_vessels(tex_rng), geo, size)
    texture = _upsample(_smooth_noise(tex_rng, _TEXTURE_GRID, 1.0), size)
    noise = tex_rng.standard_normal((size, size), dtype=np.float32)
    specs: dict[str, dict[str, np.float32]] = {}
    fields: dict[str, np.ndarray] = {}
    for k, lab in enumerate(PHANTOM_PATHOLOGIES):
        if lab in present and lab in _SPEC_DRAWERS:
            spec, field = _SPEC_DRAWERS[lab](_rng(seed, index, 10 + k), geo, size)
            specs[lab] = _f32(spec)
            if field is not None:
                fields[lab] = field
    return _Draw(present, geo, specs, fields, vessels, texture, noise)


def _choose_pathologies(seed: int, index: int, healthy_fraction: float) -> tuple[str, ...]:
    rng = _rng(seed, index, 0)
    healthy = rng.random() < healthy_fraction
    count = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    picks = rng.choice(len(PHANTOM_PATHOLOGIES), size=count, replace=False)
    return () if healthy else tuple(PHANTOM_PATHOLOGIES[k] for k in sorted(picks))


def _draw_anatomy(rng: np.random.Generator, cardiomegaly: bool, size: int) -> dict[str, float]:
    """Anatomy parameters; the draw sequence is the same with or without cardiomegaly.

    The size only matters for the rare healthy heart whose ratio could round up to 0.5.
    """
    u = rng.uniform
    # Mediastinal shift moves the midline and the heart; the chest wall stays, so one lung widens.
    shift = float(np.clip(rng.normal(0.0, 0.022), -0.05, 0.05))
    g: dict[str, float] = {"mid": 0.5 + shift}
    dlat = u(0.27, 0.37)
    top = u(0.08, 0.19)
    dome = u(0.56, 0.76)
    g["r_dlat"], g["l_dlat"] = dlat + shift, dlat * u(0.84, 1.0) - shift
    g["r_top"], g["l_top"] = top, top + u(-0.015, 0.025)
    g["r_dome"], g["l_dome"] = dome, dome + u(-0.02, 0.07)
    g["r_dmed"], g["l_dmed"] = u(0.055, 0.075), u(0.06, 0.08)
    g["r_knob"], g["l_knob"] = 0.0, u(0.015, 0.035)
    g["r_knob_t"], g["l_knob_t"] = 0.3, u(0.22, 0.32)
    for p in _PREFIX:
        g[p + "cp"] = g[p + "dome"] + u(0.055, 0.09)
        pk = u(0.4, 0.55)
        g[p + "dpk"] = pk * g[p + "dlat"]
        g[p + "kl"] = (g[p + "cp"] - g[p + "dome"]) / (1.0 - pk) ** 2
        g[p + "km"] = g[p + "kl"] * u(0.25, 0.5)
        g[p + "taper"] = u(0.2, 0.32)
        g[p + "apex"] = u(0.45, 0.7)
        g[p + "dap"] = u(0.45, 0.58) * g[p + "dlat"]
        g[p + "wob_a"] = u(0.0, 0.025)
        g[p + "wob_f"] = u(3.0, 9.0)
        g[p + "wob_p"] = u(0.0, 2 * math.pi)
        g[p + "hil_d"] = g[p + "dmed"] + u(0.01, 0.025)
        g[p + "hil_v"] = g[p + "top"] + u(0.4, 0.5) * (g[p + "cp"] - g[p + "top"])
    g["body_ax"] = min(max(g["r_dlat"], g["l_dlat"]) + u(0.07, 0.12), 0.46)
    g["neck"] = u(0.1, 0.14)
    g["sh_v"] = u(0.05, 0.1)
    g["sh_dx"] = u(0.04, 0.1)
    g["breast"] = u(0.0, 0.14)
    g["breast_v"] = u(0.68, 0.8)
    g["spine_w"] = u(0.036, 0.046)
    g["vert_period"] = u(0.048, 0.058)
    g["vert_phase"] = u(0.0, 1.0)
    g["rib_v0"] = u(0.05, 0.09)
    g["rib_sp"] = u(0.048, 0.056)
    g["rib_grow"] = u(0.0008, 0.003)
    g["rib_alpha"] = u(0.3, 0.45)
    g["rib_beta"] = u(2.0, 2.8)
    g["rib_thick"] = u(0.32, 0.4)
    g["rib_shift"] = u(-0.012, 0.012)
    g["arib_v0"] = u(0.2, 0.26)
    g["arib_sp"] = u(0.065, 0.08)
    g["arib_slope"] = u(0.35, 0.6)
    g["clav_v"] = u(0.15, 0.2)
    g["clav_rise"] = u(0.2, 0.45)
    g["clav_curv"] = u(0.3, 0.9)
    g["clav_len"] = u(0.25, 0.31)
    g["clav_w"] = u(0.013, 0.019)
    g["tr_w"] = u(0.012, 0.017)
    g["carina"] = u(0.32, 0.37)
    sto_on, sto_dx, sto_r = u(0.0, 1.0) < 0.7, u(0.1, 0.2), u(0.025, 0.045)
    g["expo"] = u(0.92, 1.08)
    g["habitus"] = u(0.9, 1.12)
    g["noise"] = u(0.006, 0.016)
    ctr_healthy, ctr_big = u(*HEALTHY_CTR_RANGE), u(*CARDIOMEGALY_CTR_RANGE)
    aspect, tilt, frac, sink, base = u(1.25, 1.5), u(0.45, 0.75), u(0.27, 0.35), u(0.6, 0.75), u(0.0, 0.015)
    egg = u(0.15, 0.35)

    left_reach = _lung_extent(g, "l_")
    thorax = _lung_extent(g, "r_") + left_reach
    # Rasterising moves each column extent by at most a pixel; keep healthy hearts below 0.5 even so.
    pixels = thorax * size
    g["ctr"] = ctr_big if cardiomegaly else min(ctr_healthy, (0.5 * (pixels - 1.0) - 1.0) / pixels - 0.002)
    width = g["ctr"] * thorax
    frac = max(frac, 1.0 - (left_reach - 0.02) / width)
    left, right, half_height = _heart_outline(aspect, tilt, egg, sink)
    b = width / (right - left)
    # The heart rests on the left hemidiaphragm: no lung is left under its flat base.
    clip = _left_diaphragm(g, np.linspace(0.0, (1.0 - frac) * width, 65)).max() + base
    g.update(h_uc=g["mid"] - frac * width - left * b, h_vc=clip - sink * half_height * b, h_clip=clip)
    g.update(h_a=aspect * b, h_b=b, h_cos=math.cos(tilt), h_sin=math.sin(tilt), h_egg=egg, h_ev=half_height * b)
    dia = float(_left_diaphragm(g, np.array([sto_dx]))[0])
    g.update(sto_on=float(sto_on), sto_u=g["mid"] + sto_dx, sto_v=dia + sto_r + 0.02, sto_r=sto_r)
    # Patient pose on the detector: in-plane rotation, distance (magnification) and centring.
    angle = u(-0.07, 0.07)
    g.update(pose_cos=math.cos(angle), pose_sin=math.sin(angle), pose_scale=u(0.88, 1.06))
    g.update(pose_du=u(-0.035, 0.035), pose_dv=u(-0.03, 0.04))
    return g


def _left_diaphragm(g: Mapping[str, float], d: np.ndarray) -> np.ndarray:
    """Height of the left hemidiaphragm at distances `d` left of the midline."""
    k = (d - g["l_dpk"]) / g["l_dlat"]
    return g["l_dome"] + np.where(k > 0, g["l_kl"], g["l_km"]) * k * k


def _heart_outline(aspect: float, tilt: float, egg: float, sink: float) -> tuple[float, float, float]:
    """Left and right reach from its centre, and half height, of the heart with minor semi-axis 1."""
    phi = np.linspace(0.0, 2 * math.pi, 4097)
    xr, yr = aspect * np.cos(phi), np.sin(phi)
    x, y = xr * math.cos(tilt) - yr * math.sin(tilt), xr * math.sin(tilt) + yr * math.cos(tilt)
    half_height = math.sqrt(aspect**2 * math.sin(tilt) ** 2 + math.cos(tilt) ** 2)
    x = x * (1.0 + egg * np.clip(y / half_height, -0.9, 0.9))
    x = x[y <= sink * half_height]
    return float(x.min()), float(x.max()), half_height


def _lung_extent(g: Mapping[str, float], p: str) -> float:
    """Widest lateral reach of a lung from the midline, from its edge curves row by row."""
    t = np.linspace(0.0, 1.0, 129)
    v = g[p + "top"] + t * (g[p + "cp"] - g[p + "top"])
    wobble = g[p + "wob_a"] * np.sin(g[p + "wob_f"] * t + g[p + "wob_p"]) * t
    lateral = g[p + "dlat"] * (1.0 - g[p + "taper"] * (1.0 - t) ** 2 + wobble)
    below_apex = g[p + "dap"] + g[p + "dlat"] * np.sqrt((v - g[p + "top"]) / g[p + "apex"])
    above_dome = g[p + "dpk"] + g[p + "dlat"] * np.sqrt(np.maximum(v - g[p + "dome"], 0.0) / g[p + "kl"])
    reach = np.minimum(lateral, below_apex)
    return float(np.max(np.where(v > g[p + "dome"], np.minimum(reach, above_dome), reach)))


# --- geometry (works on scalars for one sample and on broadcast arrays for a batch) -------------


def _lung_margin(g: Params, side: int, u: Any, v: Any) -> Any:
    """Approximate signed distance (normalised units, > 0 inside) to the lung of `side`."""
    p = _PREFIX[side]
    d = (u - g["mid"]) if side == _LEFT else (g["mid"] - u)
    top, cp, dlat = g[p + "top"], g[p + "cp"], g[p + "dlat"]
    t = np.clip((v - top) / (cp - top), 0.0, 1.0)
    wobble = g[p + "wob_a"] * np.sin(g[p + "wob_f"] * t + g[p + "wob_p"]) * t
    lateral = dlat * (1.0 - g[p + "taper"] * (1.0 - t) ** 2 + wobble)
    medial = g[p + "dmed"] + g[p + "knob"] * np.exp(-(((t - g[p + "knob_t"]) / 0.09) ** 2))
    apex = top + g[p + "apex"] * ((d - g[p + "dap"]) / dlat) ** 2
    k = (d - g[p + "dpk"]) / dlat
    dome = g[p + "dome"] + np.where(k > 0, g[p + "kl"], g[p + "km"]) * k * k
    return np.minimum(np.minimum(d - medial, lateral - d), np.minimum(v - apex, dome - v))


def _heart_margin(g: Params, u: Any, v: Any) -> Any:
    """Approximate signed distance (> 0 inside) to the heart.

    The heart is a tilted ellipse, widened towards its base (the left ventricle) and
    narrowed at the top, cut off by the diaphragm.
    """
    y = v - g["h_vc"]
    x = (u - g["h_uc"]) / (1.0 + g["h_egg"] * np.clip(y / g["h_ev"], -0.9, 0.9))
    xr = x * g["h_cos"] + y * g["h_sin"]
    yr = y * g["h_cos"] - x * g["h_sin"]
    q = np.sqrt((xr / g["h_a"]) ** 2 + (yr / g["h_b"]) ** 2)
    return np.minimum((1.0 - q) * g["h_b"], g["h_clip"] - v)


def _label_points(g: Params, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    heart = _heart_margin(g, u, v) > 0
    right = _lung_margin(g, _RIGHT, u, v) > 0
    left = _lung_margin(g, _LEFT, u, v) > 0
    return np.where(heart, Anatomy.HEART, np.where(right, Anatomy.RIGHT_LUNG, np.where(left, Anatomy.LEFT_LUNG, 0)))


def _lung_point(g: Params, side: int, t: float, s: float) -> tuple[float, float]:
    """Image point at height fraction `t` (apex 0, costophrenic angle 1) and lateral fraction `s`."""
    p = _PREFIX[side]
    d = float(g[p + "dmed"]) + s * float(g[p + "dlat"] - g[p + "dmed"])
    v = float(g[p + "top"]) + t * float(g[p + "cp"] - g[p + "top"])
    return float(g["mid"]) + (d if side == _LEFT else -d), v


def _height_fraction(g: Params, side: int, v: float) -> float:
    p = _PREFIX[side]
    return float((v - g[p + "top"]) / (g[p + "cp"] - g[p + "top"]))


_RING = np.exp(1j * np.linspace(0.0, 2 * math.pi, 12, endpoint=False))


def _pick_lung_point(
    rng: np.random.Generator,
    g: Params,
    side: int,
    t_range: tuple[float, float],
    s_range: tuple[float, float],
    radius: float,
) -> tuple[float, float]:
    """A point of the `side` lung whose disc of `radius` is all lung (not heart) by the label function."""
    offsets = np.concatenate([[0.0], radius * _RING, 0.5 * radius * _RING])
    lung_id = Anatomy.RIGHT_LUNG if side == _RIGHT else Anatomy.LEFT_LUNG
    for attempt in range(96):
        widen = 0.1 * (attempt // 32)
        t = rng.uniform(max(0.08, t_range[0] - widen), min(0.95, t_range[1] + widen))
        s = rng.uniform(max(0.05, s_range[0] - widen), min(0.95, s_range[1] + widen))
        u, v = _lung_point(g, side, t, s)
        pu = (u + offsets.real).astype(np.float32)
        pv = (v + offsets.imag).astype(np.float32)
        if np.all(_label_points(g, pu, pv) == lung_id):
            return u, v
    return _lung_point(g, side, 0.3, 0.55)


# --- pathology parameter draws -----------------------------------------------------------------

Field = np.ndarray | None
SpecDraw = tuple[dict[str, float], Field]


def _draw_effusion(rng: np.random.Generator, g: Params, size: int) -> SpecDraw:
    which = rng.choice(3, p=[0.4, 0.35, 0.25])  # right, left, both
    spec = {"on_r": float(which in (0, 2)), "on_l": float(which in (1, 2))}
    for p in _PREFIX:
        spec[p + "h"] = rng.uniform(0.07, 0.2) * (float(g[p + "cp"] - g[p + "top"]) / 0.55)
        spec[p + "men"] = rng.uniform(0.03, 0.07)
    return spec, None


def _draw_pneumothorax(rng: np.random.Generator, g: Params, size: int) -> SpecDraw:
    side = int(rng.integers(2))
    shrink = rng.uniform(0.62, 0.84)
    u, v = _lung_point(g, side, rng.uniform(0.62, 0.78), rng.uniform(0.05, 0.15))
    return {"side": side, "shrink": shrink, "au": u, "av": v}, None


def _hilum(g: Params, side: int) -> tuple[float, float]:
    """Where one lung's hilum lies, in image units (u across, v down)."""
    p = _PREFIX[side]
    sign = 1.0 if side == _LEFT else -1.0
    return float(g["mid"]) + sign * float(g[p + "hil_d"]), float(g[p + "hil_v"])


def _from_hilum(g: Params, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's offset from the hilum of its own side: lateral distance beyond it, and height below it."""
    left = u > g["mid"]
    lateral = np.abs(u - g["mid"]) - np.where(left, g["l_hil_d"], g["r_hil_d"])
    return lateral, v - np.where(left, g["l_hil_v"], g["r_hil_v"])


def _draw_consolidation(rng: np.random.Generator, g: Params, size: int) -> SpecDraw:
    """A patch of airspace opacity, wider than any nodule, ill-defined, with air bronchograms."""
    side = int(rng.integers(2))
    rx, ry = rng.uniform(0.11, 0.16), rng.uniform(0.12, 0.18)
    core = max(0.03, 1.6 / size)
    u, v = _pick_lung_point(rng, g, side, (0.3, 0.85), (0.25, 0.75), max(core, 0.5 * min(rx, ry)))
    spec = {"side": side, "cu": u, "cv": v, "core": core, "zone": _height_fraction(g, side, v)}
    spec.update(rx=rx, ry=ry, rot=rng.uniform(0, math.pi), dens=rng.uniform(0.55, 0.8))
    # The bronchi run out from the hilum, so their lucent lines point away from it.
    hilum_u, hilum_v = _hilum(g, side)
    outward = math.atan2(v - hilum_v, u - hilum_u)
    spec.update(br1=outward - rng.uniform(0.1, 0.4), br2=outward + rng.uniform(0.1, 0.4))
    return spec, _upsample(_smooth_noise(rng, 2 * _PATCH_GRID, 1.0), size)


def _draw_lesion(rng: np.random.Generator, g: Params, size: int) -> SpecDraw:
    """A well-defined nodule (or small mass), always smaller than a consolidation."""
    side = int(rng.integers(2))
    radius = max(rng.uniform(0.028, 0.055), 1.6 / size)
    lobes = rng.uniform(0.0, 0.07) if radius > 0.03 else 0.0
    spec = {"side": side, "r": radius, "lob": lobes, "dens": rng.uniform(0.45, 0.65)}
    spec.update(lob_p2=rng.uniform(0, 2 * math.pi), lob_p3=rng.uniform(0, 2 * math.pi))
    u, v = _pick_lung_point(rng, g, side, (0.15, 0.8), (0.2, 0.85), radius * (1.0 + 2.0 * lobes))
    spec.update(cu=u, cv=v, zone=_height_fraction(g, side, v))
    return spec, None


def _draw_atelectasis(rng: np.random.Generator, g: Params, size: int) -> SpecDraw:
    side = int(rng.integers(2))
    half = max(rng.uniform(0.012, 0.02), 1.3 / size)
    p = _PREFIX[side]
    length = rng.uniform(0.4, 0.75) * float(g[p + "dlat"] - g[p + "dmed"])
    tilt = rng.uniform(-0.3, 0.3)
    u, v = _pick_lung_point(rng, g, side, (0.62, 0.84), (0.3, 0.7), max(2 * half, 1.6 / size))
    spec = {"side": side, "cu": u, "cv": v, "half": half, "len": length, "dens": rng.uniform(0.3, 0.45)}
    spec.update(cos=math.cos(tilt), sin=math.sin(tilt), zone=_height_fraction(g, side, v))
    return spec, None


def _draw_edema(rng: np.random.Generator, g: Params, size: int) -> SpecDraw:
    spec = {"sx": rng.uniform(0.1, 0.15), "sy": rng.uniform(0.12, 0.17), "dens": rng.uniform(0.45, 0.75)}
    return spec, _upsample(_smooth_noise(rng, _PATCH_GRID, 1.0), size)


_SPEC_DRAWERS: dict[str, Callable[[np.random.Generator, Params, int], SpecDraw]] = {
    "Pleural Effusion": _draw_effusion,
    "Pneumothorax": _draw_pneumothorax,
    "Consolidation": _draw_consolidation,
    "Lung Lesion": _draw_lesion,
    "Atelectasis": _draw_atelectasis,
    "Edema": _draw_edema,
}


# --- noise fields --------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, grid: int, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal((grid, grid)), sigma, mode="wrap")
    return (field / field.std()).astype(np.float32)


@lru_cache(maxsize=32)
def _upsample_matrix(size: int, grid: int) -> np.ndarray:
    """Catmull-Rom interpolation from `grid` nodes spanning [0, 1] to `size` pixel centres."""
    pos = (np.arange(size) + 0.5) / size * (grid - 1)
    j0 = np.floor(pos).astype(int)
    t = pos - j0
    weights = (
        ((-t + 2) * t - 1) * t / 2,
        ((3 * t - 5) * t * t + 2) / 2,
        ((-3 * t + 4) * t + 1) * t / 2,
        (t - 1) * t * t / 2,
    )
    matrix = np.zeros((size, grid))
    rows = np.arange(size)
    for k, w in enumerate(weights):
        np.add.at(matrix, (rows, np.clip(j0 - 1 + k, 0, grid - 1)), w)
    matrix = matrix.astype(np.float32)
    matrix.setflags(write=False)
    return matrix


def _upsample(field: np.ndarray, size: int) -> np.ndarray:
    matrix = _upsample_matrix(size, field.shape[0])
    return matrix @ field @ matrix.T


# --- rendering -------------------------------------------------------------------------------------


def _stack(dicts: Sequence[Mapping[str, np.float32]]) -> dict[str, np.ndarray]:
    return {key: np.array([d[key] for d in dicts], np.float32).reshape(-1, 1, 1) for key in dicts[0]}


def _soft(margin: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Anti-aliased occupancy from a margin and the pixels per body unit: 0.5 exactly on the boundary."""
    return np.clip(0.5 + margin * pixels, 0.0, 1.0)


def _body_coordinates(g: Params, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel centre in the body's own frame: the image frame with the patient's pose undone."""
    axis = ((np.arange(size, dtype=np.float32) + 0.5) / np.float32(size)).astype(np.float32)
    x = axis.reshape(1, 1, size) - 0.5 - g["pose_du"]
    y = axis.reshape(1, size, 1) - 0.5 - g["pose_dv"]
    cos, sin, scale = g["pose_cos"], g["pose_sin"], g["pose_scale"]
    return 0.5 + (cos * x + sin * y) / scale, 0.5 + (cos * y - sin * x) / scale


def _image_coordinates(g: Params, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Body-frame points in the image frame (the inverse of `_body_coordinates`)."""
    x, y = (u - 0.5) * g["pose_scale"], (v - 0.5) * g["pose_scale"]
    cos, sin = g["pose_cos"], g["pose_sin"]
    return 0.5 + g["pose_du"] + cos * x - sin * y, 0.5 + g["pose_dv"] + sin * x + cos * y


def _render(draws: Sequence[_Draw], size: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    n = len(draws)
    g = _stack([d.geo for d in draws])
    u, v = _body_coordinates(g, size)

    m_right, m_left = _lung_margin(g, _RIGHT, u, v), _lung_margin(g, _LEFT, u, v)
    m_heart = _heart_margin(g, u, v)
    heart = m_heart > 0
    lung_r = (m_right > 0) & ~heart
    lung_l = (m_left > 0) & ~heart
    anatomy = np.zeros((n, size, size), np.uint8)
    anatomy[m_left > 0] = Anatomy.LEFT_LUNG
    anatomy[m_right > 0] = Anatomy.RIGHT_LUNG
    anatomy[heart] = Anatomy.HEART

    pixels = np.float32(size) * g["pose_scale"]
    s_heart = _soft(m_heart, pixels)
    s_right, s_left = _soft(m_right, pixels), _soft(m_left, pixels)
    air_r = s_right * (0.45 + 0.55 * np.sqrt(np.clip(m_right / 0.06, 0.0, 1.0)))
    air_l = s_left * (0.45 + 0.55 * np.sqrt(np.clip(m_left / 0.06, 0.0, 1.0)))
    keep = 1.0 - 0.9 * s_heart
    air_r *= keep
    air_l *= keep
    lung_soft = (s_right + s_left) * (1.0 - s_heart)

    tissue = _body(g, u, v) * g["habitus"]
    atten = tissue + 0.04 * s_heart + _bones(g, u, v) * np.clip(3.0 * tissue, 0.0, 1.0) - _airways(g, u, v)
    ridge, texture = _lung_texture(g, u, v, np.stack([d.vessels for d in draws]), np.stack([d.texture for d in draws]))
    texture *= lung_soft

    masks: dict[str, np.ndarray] = {lab: np.zeros((n, size, size), bool) for lab in PHANTOM_PATHOLOGIES}
    ctx = _Context(g, u, v, size, lung_r, lung_l, air_r, air_l, ridge, atten, texture)
    for lab in PHANTOM_PATHOLOGIES:
        idx = np.array([k for k, d in enumerate(draws) if lab in d.present], dtype=np.intp)
        if idx.size == 0:
            continue
        if lab == "Cardiomegaly":
            masks[lab][idx] = heart[idx]
            continue
        spec = _stack([draws[k].specs[lab] for k in idx])
        field = np.stack([draws[k].fields[lab] for k in idx]) if lab in draws[idx[0]].fields else None
        masks[lab][idx] = _PAINTERS[lab](ctx, idx, spec, field)

    atten -= 0.75 * (air_r + air_l)
    atten += texture
    expo = g["expo"] * np.float32(_KAPPA)
    image = 1.0 - np.exp(-expo * np.maximum(atten, 0.0))
    sigma = max(0.45, _BLUR * size)
    image = ndimage.gaussian_filter(image, (0.0, sigma, sigma), mode="nearest")
    image += g["noise"] * (0.5 + 0.5 * image) * np.stack([d.noise for d in draws])
    np.clip(image, 0.0, 1.0, out=image)
    return image.astype(np.float32, copy=False), anatomy, masks


def _body(g: Params, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Soft-tissue path length: trunk widening into the shoulders, neck, breast shadows."""
    dx = u - g["mid"]
    waist = 1.0 - 0.1 * np.clip((v - 0.7) / 0.3, 0.0, 1.0)
    half = g["body_ax"] * waist + g["sh_dx"] * np.exp(-(((v - 0.12) / 0.12) ** 2))
    across = np.clip(1.0 - (dx / half) ** 2, 0.0, 1.0)
    shoulder_top = g["sh_v"] * np.clip((np.abs(dx) - g["neck"]) / 0.15, 0.0, 1.0) ** 0.5
    down = np.clip((v - shoulder_top) / 0.1, 0.0, 1.0)
    tissue = np.sqrt(across * down)
    lateral = np.exp(-(((np.abs(dx) - 0.6 * g["body_ax"]) / (0.25 * g["body_ax"])) ** 2))
    tissue += g["breast"] * lateral * np.exp(-(((v - g["breast_v"]) / 0.09) ** 2))
    return tissue


def _bones(g: Params, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Spine, posterior ribs and clavicles."""
    dx = u - g["mid"]
    d = np.abs(dx)
    w = g["spine_w"]
    across = np.sqrt(np.clip(1.0 - (dx / w) ** 2, 0.0, 1.0))
    phase = np.mod(v / g["vert_period"] + g["vert_phase"], 1.0)
    disc = 1.0 - 0.4 * np.exp(-(((phase - 0.5) / 0.07) ** 2))
    pedicles = np.exp(-(((d - 0.62 * w) / (0.2 * w)) ** 2) - ((phase - 0.25) / 0.13) ** 2)
    spinous = np.exp(-((dx / (0.15 * w)) ** 2) - ((phase - 0.75) / 0.12) ** 2)
    bone = 0.15 * across * disc + 0.1 * pedicles + 0.05 * spinous

    # Posterior ribs: centre lines v = v0_k + curve(d), spacing growing by `grow` per rib.
    dlat = np.where(dx > 0, g["l_dlat"], g["r_dlat"])
    w_rib = v - (g["rib_beta"] * d - g["rib_alpha"]) * d - np.where(dx > 0, g["rib_shift"], 0.0)
    sp, grow = g["rib_sp"], g["rib_grow"]
    k = (np.sqrt(np.maximum(sp * sp + 4.0 * grow * (w_rib - g["rib_v0"]), 0.0)) - sp) / (2.0 * grow)
    frac = k - np.floor(k)
    q = np.clip(2.0 * frac / g["rib_thick"] - 1.0, -1.0, 1.0)
    inside = (k >= 0) & (frac < g["rib_thick"])
    profile = 0.6 * np.sqrt(1.0 - q * q) + 0.4 * np.exp(-(((np.abs(q) - 0.8) / 0.15) ** 2))
    reach = np.clip((dlat + 0.05 - d) / 0.04, 0.0, 1.0) * np.clip((d - 0.8 * w) / 0.02, 0.0, 1.0)
    bone += 0.16 * np.where(inside, profile, 0.0) * reach * np.clip(10.5 - k, 0.0, 1.0)

    # Anterior ribs: fainter bands running down towards the midline from the lateral chest wall.
    wa = (v - g["arib_v0"] - g["arib_slope"] * (dlat - d) + 1.2 * (dlat - d) ** 2) / g["arib_sp"]
    fa = wa - np.floor(wa)
    qa = np.clip(2.0 * fa / 0.3 - 1.0, -1.0, 1.0)
    ant = (wa >= 0) & (wa < 6) & (fa < 0.3)
    fade = np.clip((d - 0.12) / 0.08, 0.0, 1.0) * np.clip((dlat + 0.02 - d) / 0.03, 0.0, 1.0)
    bone += 0.07 * np.where(ant, np.sqrt(1.0 - qa * qa), 0.0) * fade

    centre = g["clav_v"] + (g["clav_curv"] * d - g["clav_rise"]) * d
    qc = (v - centre) / g["clav_w"]
    ends = np.clip((d - 0.02) / 0.02, 0.0, 1.0) * np.clip((g["clav_len"] - d) / 0.03, 0.0, 1.0)
    bone += 0.26 * np.sqrt(np.clip(1.0 - qc * qc, 0.0, 1.0)) * ends
    return bone


def _airways(g: Params, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Air outside the lungs: trachea and gastric bubble."""
    tr = np.sqrt(np.clip(1.0 - ((u - g["mid"]) / g["tr_w"]) ** 2, 0.0, 1.0))
    air = 0.16 * tr * np.clip((g["carina"] - v) / 0.03, 0.0, 1.0)
    r = g["sto_r"]
    q = ((u - g["sto_u"]) / (1.4 * r)) ** 2 + ((v - g["sto_v"]) / r) ** 2
    return air + 0.3 * g["sto_on"] * np.sqrt(np.clip(1.0 - q, 0.0, 1.0))


def _lung_texture(
    g: Params, u: np.ndarray, v: np.ndarray, vessels: np.ndarray, mottle: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Blurred vessel trees, hilar density and parenchymal mottling; also the vessel map alone."""
    size = u.shape[-1]
    thick, thin = (
        ndimage.gaussian_filter(vessels[:, k], (0.0, sigma * size, sigma * size), mode="constant")
        for k, sigma in enumerate(_VESSEL_SIGMA)
    )
    dx, dy = _from_hilum(g, u, v)
    hilum = np.exp(-(dx * dx + dy * dy) / 0.045**2)
    ridge = np.clip(thick + thin, 0.0, 1.0)
    return ridge, 0.16 * thick + 0.1 * thin + 0.12 * hilum + 0.025 * mottle


def _draw_vessels(rng: np.random.Generator) -> np.ndarray:
    """Branching vessel segments of both lungs, relative to each hilum in (lateral, down) units.

    Returns (2, M, 5): x0, y0, x1, y1 and the branch generation of each segment.
    """
    trees = []
    for _ in range(2):
        angle = np.linspace(-1.5, 1.6, _TREE_ROOTS) + rng.uniform(-0.15, 0.15, _TREE_ROOTS)
        length = rng.uniform(0.05, 0.09, _TREE_ROOTS)
        # The roots leave a hilum that spans about 0.1 vertically, upper lobe branches from its top.
        x = np.zeros(_TREE_ROOTS)
        y = 0.035 * np.sin(angle) + rng.uniform(-0.01, 0.01, _TREE_ROOTS)
        segments = []
        for gen in range(_TREE_DEPTH):
            x1, y1 = x + length * np.cos(angle), y + length * np.sin(angle)
            segments.append(np.stack([x, y, x1, y1, np.full_like(x, gen)], axis=1))
            turn = rng.uniform(0.2, 0.55, (x.size, 2)) * np.array([-1.0, 1.0])
            angle = (angle[:, None] + turn).ravel()
            x, y = np.repeat(x1, 2), np.repeat(y1, 2)
            length = np.repeat(length, 2) * rng.uniform(0.6, 0.8, 2 * length.size)
        trees.append(np.concatenate(segments))
    return np.stack(trees)


def _splat_vessels(trees: np.ndarray, geo: Mapping[str, np.float32], size: int) -> np.ndarray:
    """Line densities of the vessel trees on the pixel grid: (2, S, S), thick then thin branches.

    Points every half pixel are splatted bilinearly with weights that make each
    line peak at about its generation weight once blurred by its _VESSEL_SIGMA.
    """
    out = np.zeros((2, size * size))
    for side, tree in enumerate(trees):
        sign = 1.0 if side == _LEFT else -1.0
        ox, oy = _hilum(geo, side)
        x0, y0 = (c * size - 0.5 for c in _image_coordinates(geo, ox + sign * tree[:, 0], oy + tree[:, 1]))
        x1, y1 = (c * size - 0.5 for c in _image_coordinates(geo, ox + sign * tree[:, 2], oy + tree[:, 3]))
        gen = tree[:, 4]
        steps = np.ceil(2.0 * np.hypot(x1 - x0, y1 - y0)).astype(int) + 1
        seg = np.repeat(np.arange(tree.shape[0]), steps)
        t = (np.arange(seg.size) - np.repeat(np.cumsum(steps) - steps, steps)) / np.repeat(steps - 1, steps)
        px, py = x0[seg] + t * (x1 - x0)[seg], y0[seg] + t * (y1 - y0)[seg]
        step = np.hypot(x1 - x0, y1 - y0)[seg] / np.repeat(steps - 1, steps)
        thin = gen[seg] >= 2
        sigma = np.where(thin, _VESSEL_SIGMA[1], _VESSEL_SIGMA[0]) * size
        weight = 0.72 ** gen[seg] * step * math.sqrt(2 * math.pi) * sigma
        ix, iy = np.floor(px).astype(int), np.floor(py).astype(int)
        fx, fy = px - ix, py - iy
        for cx, cy, w in (
            (0, 0, (1 - fx) * (1 - fy)),
            (1, 0, fx * (1 - fy)),
            (0, 1, (1 - fx) * fy),
            (1, 1, fx * fy),
        ):
            jx, jy = ix + cx, iy + cy
            ok = (jx >= 0) & (jx < size) & (jy >= 0) & (jy < size)
            flat = jy[ok] * size + jx[ok]
            for k, pick in enumerate((~thin[ok], thin[ok])):
                out[k] += np.bincount(flat[pick], (weight * w)[ok][pick], minlength=size * size)
    return out.reshape(2, size, size).astype(np.float32)


@dataclass
class _Context:
    """Batch fields shared by the pathology painters; painters edit `atten` and `texture` in place."""

    g: dict[str, np.ndarray]
    u: np.ndarray
    v: np.ndarray
    size: int
    lung_r: np.ndarray
    lung_l: np.ndarray
    air_r: np.ndarray
    air_l: np.ndarray
    ridge: np.ndarray
    atten: np.ndarray
    texture: np.ndarray

    def sub(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {key: val[idx] for key, val in self.g.items()}

    def side(self, idx: np.ndarray, side: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lung-labelled pixels and lung air of each case's chosen side."""
        right = side < 0.5
        return (
            np.where(right, self.lung_r[idx], self.lung_l[idx]),
            np.where(right, self.air_r[idx], self.air_l[idx]),
        )


def _paint_effusion(ctx: _Context, idx: np.ndarray, spec: Params, field: Field) -> np.ndarray:
    g, u, v = ctx.sub(idx), ctx.u[idx], ctx.v[idx]
    mask = np.zeros((idx.size, ctx.size, ctx.size), bool)
    for side, p, lung, air in ((_RIGHT, "r_", ctx.lung_r, ctx.air_r), (_LEFT, "l_", ctx.lung_l, ctx.air_l)):
        d = (u - g["mid"]) if side == _LEFT else (g["mid"] - u)
        s = np.clip((d - g[p + "dmed"]) / (g[p + "dlat"] - g[p + "dmed"]), 0.0, 1.0)
        level = g[p + "cp"] - spec[p + "h"] + spec[p + "men"] * (1.0 - s) ** 2
        fluid = lung[idx] & (v > level) & (spec["on_" + p[0]] > 0.5)
        fill = np.where(fluid, np.clip((v - level) / 0.03, 0.0, 1.0) ** 0.7, 0.0)
        ctx.atten[idx] += fill * (0.75 * air[idx] + 0.22)
        ctx.texture[idx] *= 1.0 - fill
        mask |= fluid
    return mask


def _paint_pneumothorax(ctx: _Context, idx: np.ndarray, spec: Params, field: Field) -> np.ndarray:
    g, u, v = ctx.sub(idx), ctx.u[idx], ctx.v[idx]
    lung, _ = ctx.side(idx, spec["side"])
    f = spec["shrink"]
    # The collapsed lung is the lung shrunk towards a medial anchor; below the anchor only sideways.
    cu = spec["au"] + (u - spec["au"]) / f
    cv = np.where(v < spec["av"], spec["av"] + (v - spec["av"]) / f, v)
    m_coll = np.where(spec["side"] < 0.5, _lung_margin(g, _RIGHT, cu, cv), _lung_margin(g, _LEFT, cu, cv)) * f
    m_orig = np.where(spec["side"] < 0.5, _lung_margin(g, _RIGHT, u, v), _lung_margin(g, _LEFT, u, v))
    collapsed = lung & (m_coll > 0)
    rim = lung & ~collapsed
    width = max(0.004, 0.6 / ctx.size)
    line = np.exp(-((m_coll / width) ** 2)) * collapsed * np.clip(m_orig * ctx.size - 1.0, 0.0, 1.0)
    ctx.atten[idx] += 0.05 * collapsed + 0.16 * line - 0.12 * rim
    ctx.texture[idx] *= ~rim
    return rim


def _paint_consolidation(ctx: _Context, idx: np.ndarray, spec: Params, field: Field) -> np.ndarray:
    u, v = ctx.u[idx], ctx.v[idx]
    lung, air = ctx.side(idx, spec["side"])
    x, y = u - spec["cu"], v - spec["cv"]
    cos, sin = np.cos(spec["rot"]), np.sin(spec["rot"])
    q = ((x * cos + y * sin) / spec["rx"]) ** 2 + ((y * cos - x * sin) / spec["ry"]) ** 2
    score = (1.0 - q) + 0.5 * field
    mask = lung & (q < 1.0) & ((score > 0.3) | (x * x + y * y < spec["core"] ** 2))
    margin = np.clip((1.0 - q) / 0.4, 0.0, 1.0)
    patches = np.clip(0.55 + 0.8 * (score - 0.3), 0.35, 1.0)
    strength = np.where(mask, spec["dens"] * margin * patches, 0.0)
    width = max(0.006, 0.5 / ctx.size)
    for key in ("br1", "br2"):
        along = x * np.cos(spec[key]) + y * np.sin(spec[key])
        across = y * np.cos(spec[key]) - x * np.sin(spec[key])
        tube = np.exp(-((across / width) ** 2)) * (along > -0.5 * spec["rx"]) * (q < 0.8)
        strength *= 1.0 - 0.55 * tube
    ctx.atten[idx] += strength * (0.75 * air + 0.12) - 0.12 * strength * ctx.ridge[idx]
    ctx.texture[idx] *= 1.0 - 0.6 * strength
    return mask


def _paint_lesion(ctx: _Context, idx: np.ndarray, spec: Params, field: Field) -> np.ndarray:
    u, v = ctx.u[idx], ctx.v[idx]
    lung, _ = ctx.side(idx, spec["side"])
    x, y = u - spec["cu"], v - spec["cv"]
    angle = np.arctan2(y, x)
    lobes = np.sin(2.0 * angle + spec["lob_p2"]) + np.sin(3.0 * angle + spec["lob_p3"])
    radius = spec["r"] * (1.0 + spec["lob"] * lobes)
    rr = (x * x + y * y) / (radius * radius)
    mask = lung & (rr < 1.0)
    ctx.atten[idx] += np.where(mask, spec["dens"] * np.sqrt(np.clip(1.0 - rr, 0.0, 1.0)) ** 0.6, 0.0)
    return mask


def _paint_atelectasis(ctx: _Context, idx: np.ndarray, spec: Params, field: Field) -> np.ndarray:
    u, v = ctx.u[idx], ctx.v[idx]
    lung, _ = ctx.side(idx, spec["side"])
    x, y = u - spec["cu"], v - spec["cv"]
    along = (x * spec["cos"] + y * spec["sin"]) / (0.5 * spec["len"])
    across = (y * spec["cos"] - x * spec["sin"]) / spec["half"]
    half = np.sqrt(np.clip(1.0 - along**6, 0.0, 1.0))
    mask = lung & (np.abs(along) < 1.0) & (np.abs(across) < half)
    profile = np.clip(1.0 - (across / np.maximum(half, 1e-3)) ** 2, 0.0, 1.0)
    ctx.atten[idx] += np.where(mask, spec["dens"] * (0.3 + 0.7 * profile), 0.0)
    return mask


def _paint_edema(ctx: _Context, idx: np.ndarray, spec: Params, field: Field) -> np.ndarray:
    g, u, v = ctx.sub(idx), ctx.u[idx], ctx.v[idx]
    lungs = ctx.lung_r[idx] | ctx.lung_l[idx]
    dx, dy = _from_hilum(g, u, v)
    dx, dy = dx / spec["sx"], dy / spec["sy"]
    haze = spec["dens"] * np.exp(-(dx * dx) - dy * dy) * (0.75 + 0.25 * np.tanh(field))
    haze = np.where(lungs, haze, 0.0)
    peak = haze.max(axis=(1, 2), keepdims=True)
    ctx.atten[idx] += haze
    return lungs & (haze >= _EDEMA_MASK_FRACTION * peak) & (haze > 0)


_PAINTERS: dict[str, Callable[[_Context, np.ndarray, Params, Field], np.ndarray]] = {
    "Pleural Effusion": _paint_effusion,
    "Pneumothorax": _paint_pneumothorax,
    "Consolidation": _paint_consolidation,
    "Lung Lesion": _paint_lesion,
    "Atelectasis": _paint_atelectasis,
    "Edema": _paint_edema,
}


# --- reports ----------------------------------------------------------------------------------------


def _zone(fraction: float) -> str:
    return "upper" if fraction < 0.38 else "mid" if fraction < 0.66 else "lower"


def _finding(draw: _Draw, anatomy: np.ndarray) -> str:
    if not draw.present:
        return HEALTHY_FINDING
    sentences: dict[str, str] = {}
    for lab in draw.present:
        spec = draw.specs.get(lab, {})
        side = _SIDE_NAMES[int(spec.get("side", 0))]
        if lab == "Cardiomegaly":
            ratio = cardiothoracic_ratio(anatomy)
            sentences[lab] = f"Enlarged cardiac silhouette (cardiothoracic ratio {ratio:.2f})."
        elif lab == "Pleural Effusion":
            sides = [name for name, p in zip(_SIDE_NAMES, _PREFIX, strict=True) if spec["on_" + p[0]] > 0.5]
            height = max(float(spec[p + "h"]) for p in _PREFIX if spec["on_" + p[0]] > 0.5)
            amount = "Small" if height < 0.13 else "Moderate"
            where = "bilateral pleural effusions" if len(sides) == 2 else f"{sides[0]} pleural effusion"
            sentences[lab] = f"{amount} {where} blunting the costophrenic angle{'s' if len(sides) == 2 else ''}."
        elif lab == "Pneumothorax":
            amount = "Moderate" if spec["shrink"] < 0.72 else "Small"
            sentences[lab] = f"{amount} {side} pneumothorax with a visible pleural line."
        elif lab == "Consolidation":
            sentences[lab] = f"Patchy consolidation in the {side} {_zone(float(spec['zone']))} zone."
        elif lab == "Lung Lesion":
            kind = "mass" if spec["r"] >= 0.045 else "nodule"
            shape = "Lobulated" if spec["lob"] > 0.035 else "Round"
            sentences[lab] = f"{shape} {kind} in the {side} {_zone(float(spec['zone']))} zone."
        elif lab == "Atelectasis":
            sentences[lab] = f"Plate-like atelectasis in the {side} {_zone(float(spec['zone']))} zone."
        elif lab == "Edema":
            amount = "Mild" if spec["dens"] < 0.6 else "Moderate"
            sentences[lab] = f"{amount} bilateral perihilar haziness in keeping with pulmonary edema."
    return " ".join(sentences[lab] for lab in canonical_labels(draw.present))


def _boxes(masks: Mapping[str, np.ndarray], anatomy: np.ndarray) -> tuple[Box, ...]:
    """One box per pathology and lung it touches (the heart's box for cardiomegaly), CheXpert order."""
    boxes: list[Box] = []
    for lab in canonical_labels(masks):
        if lab == NO_FINDING:
            continue
        mask = masks[lab]
        parts = [mask & (anatomy == lung) for lung in (Anatomy.RIGHT_LUNG, Anatomy.LEFT_LUNG)]
        parts = [part for part in parts if part.any()] or [mask]
        boxes.extend((lab, *mask_box(part)) for part in parts if part.any())
    return tuple(boxes)
