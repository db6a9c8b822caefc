"""Sampler settings shared by the manifest, the audit, the run and the sampler."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from xreal.core.errors import XRealError
from xreal.core.labels import NO_FINDING, canonical_label

NUM_TRAIN_TIMESTEPS = 1000
# The schedulers XRealPipeline can sample with (xreal.model.sampling.SAMPLERS builds them).
SAMPLER_NAMES = ("ddim", "dpmsolver++", "dpmsolver++-sde", "unipc")
# "exact": exactly ``steps`` steps, spaced by the scheduler. "reference": the reference implementation's DDIM grid,
# every 1000 // steps from t = 1 up, which is more than ``steps`` steps when ``steps`` does not divide 1000
# (30 gives 31 steps from t = 991, 60 gives 63).
STEP_GRIDS = ("exact", "reference")
MAX_GUIDANCE = 50.0  # the largest classifier-free guidance scale a manifest, a run or a finding table may ask for


def reference_grid(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, offset: int = 1) -> list[int]:
    """The reference implementation's DDIM timesteps for ``steps``, noisiest first."""
    return [t + offset for t in reversed(range(0, num_train_timesteps, num_train_timesteps // steps))]


def check_reference_grid(steps: int, where: str = "step grid") -> None:
    """Refuse step counts whose reference grid passes the last training step (3, 9, 37, ... reach t = 1000, where
    the reference itself fails)."""
    last = reference_grid(steps)[0]
    if last >= NUM_TRAIN_TIMESTEPS:
        raise XRealError(
            f"{where}: the reference step grid at {steps} steps reaches t = {last}, past the last training step "
            f"({NUM_TRAIN_TIMESTEPS - 1}; the reference fails there too); choose another number of steps"
        )


def guided_step(interval: tuple[float, float], step: int, steps: int) -> bool:
    """Whether step ``step`` (from 0) of ``steps`` lies in the guidance interval ``[start, stop)``."""
    start, stop = interval
    return start <= step / steps < stop


@dataclass(frozen=True)
class SamplerSettings:
    """Two-stage XReal sampling settings; defaults are the reference implementation's.

    ``guidance_interval``: the part of stage 2's steps, as fractions ``[start, stop)`` of the step sequence
    (noisiest first), where classifier-free guidance runs; outside it each step costs one UNet evaluation.
    ``healthy_guidance_scale``: classifier-free guidance of stage 1 away from the findings the model knows (the
    healthy twin's empty prompt against a negative prompt naming them); 1 or less turns it off, as the reference.
    ``finding_guidance``: stage 2's guidance for requests of a given finding, ``(label, scale)`` pairs; a request
    takes the largest of its findings' scales (``guidance_scale`` for a finding without one), see
    :meth:`for_labels`. A ``guidance_scale`` given as an override without a table clears it.
    """

    steps: int = 100
    anatomy_steps: int = 50
    guidance_scale: float = 7.0
    soft_scale: float = 0.2
    eta: float = 1.0
    sampler: str = "ddim"
    step_grid: str = "exact"
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    healthy_guidance_scale: float = 1.0
    finding_guidance: tuple[tuple[str, float], ...] = ()

    def with_overrides(self, **overrides: Any) -> SamplerSettings:
        """A copy with the non-None overrides applied."""
        changed = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(changed) - set(self.__dataclass_fields__))
        if unknown:
            raise XRealError(
                f"unknown sampler setting {', '.join(map(repr, unknown))}; the settings are "
                f"{', '.join(self.__dataclass_fields__)}"
            )
        if "guidance_interval" in changed:
            changed["guidance_interval"] = tuple(float(x) for x in changed["guidance_interval"])
        if "finding_guidance" in changed:
            changed["finding_guidance"] = _finding_table(changed["finding_guidance"])
        elif "guidance_scale" in changed:
            changed["finding_guidance"] = ()  # one scale asked for every request
        return replace(self, **changed)

    def for_labels(self, labels: Iterable[str]) -> SamplerSettings:
        """The settings for one request of ``labels``: its guidance is the largest of its findings' scales in
        ``finding_guidance`` (``guidance_scale`` for a finding the table leaves out)."""
        table = dict(self.finding_guidance)
        findings = [label for label in labels if label != NO_FINDING]
        if not table or not findings:
            return self
        return replace(self, guidance_scale=max(table.get(label, self.guidance_scale) for label in findings))

    def check(self, where: str = "sampler settings") -> SamplerSettings:
        """These settings, or an error naming the setting that is wrong and ``where`` it came from."""
        if self.sampler not in SAMPLER_NAMES:
            raise XRealError(f"{where}: unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLER_NAMES)}")
        if self.step_grid not in STEP_GRIDS:
            raise XRealError(f"{where}: unknown step grid {self.step_grid!r}; choose one of {', '.join(STEP_GRIDS)}")
        if self.step_grid == "reference" and self.sampler != "ddim":
            raise XRealError(f"{where}: the reference step grid is the reference's DDIM grid; use it with ddim")
        if not 1 <= self.steps <= NUM_TRAIN_TIMESTEPS:
            raise XRealError(f"{where}: steps must be between 1 and {NUM_TRAIN_TIMESTEPS}, got {self.steps}")
        if self.step_grid == "reference":
            check_reference_grid(self.steps, where)
        if not 0 <= self.anatomy_steps <= self.steps:
            raise XRealError(
                f"{where}: anatomy steps must be between 0 and steps ({self.steps}), got {self.anatomy_steps}"
            )
        start, stop = self.guidance_interval
        if not 0.0 <= start < stop <= 1.0:
            raise XRealError(
                f"{where}: the guidance interval must be two fractions 0 <= start < stop <= 1, got {start}, {stop}"
            )
        if not 0.0 <= self.healthy_guidance_scale <= MAX_GUIDANCE:
            raise XRealError(
                f"{where}: healthy guidance must lie in [0, {MAX_GUIDANCE:g}], got {self.healthy_guidance_scale}"
            )
        for label, scale in self.finding_guidance:
            if not 0.0 <= scale <= MAX_GUIDANCE:
                raise XRealError(f"{where}: the guidance for {label} must lie in [0, {MAX_GUIDANCE:g}], got {scale}")
        return self

    def anatomy_steps_for(self, steps: int) -> int:
        """Stage-1 anatomy steps that keep these settings' share of anatomy steps at ``steps`` steps per stage."""
        return round(steps * self.anatomy_steps / self.steps)

    @property
    def steps_run(self) -> int:
        """Sampler steps per stage: ``steps``, or the reference grid's count."""
        return len(reference_grid(self.steps)) if self.step_grid == "reference" else self.steps

    def unet_evaluations(self, has_pathology: bool) -> int:
        """UNet evaluations (per image) for one sample: stage 1, plus stage 2 unless No Finding, where every
        guided step costs two."""
        n = self.steps_run
        stage1 = 2 * n if self.healthy_guidance_scale > 1.0 else n
        if not has_pathology:
            return stage1
        guided = sum(guided_step(self.guidance_interval, i, n) for i in range(n)) if self.guidance_scale > 1.0 else 0
        return stage1 + n + guided

    def shared_arguments(self) -> dict[str, Any]:
        """The ``XRealPipeline`` arguments every item of a batch shares (one scheduler per call); guidance and
        soft scale may differ per item and are passed apart."""
        return {
            "num_inference_steps": self.steps,
            "anatomy_steps": self.anatomy_steps,
            "eta": self.eta,
            "sampler": self.sampler,
            "step_grid": self.step_grid,
            "guidance_interval": self.guidance_interval,
            "healthy_guidance_scale": self.healthy_guidance_scale,
        }

    def pipeline_arguments(self, labels: Iterable[Iterable[str]] | None = None) -> dict[str, Any]:
        """Every ``XRealPipeline`` argument these settings set, for a call whose items all take them; with the
        items' ``labels``, guidance per item as :meth:`for_labels` gives it."""
        guidance = self.guidance_scale if labels is None else [self.for_labels(item).guidance_scale for item in labels]
        return {**self.shared_arguments(), "guidance_scale": guidance, "soft_scale": self.soft_scale}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the guidance interval as a list, the finding table as a mapping), as run records pin it."""
        return {
            **asdict(self),
            "guidance_interval": list(self.guidance_interval),
            "finding_guidance": dict(self.finding_guidance),
        }


def _finding_table(table: Mapping[str, float] | Iterable[tuple[str, float]]) -> tuple[tuple[str, float], ...]:
    """``finding_guidance`` as sorted ``(label, scale)`` pairs, labels checked and spelt as CheXpert does."""
    pairs = table.items() if isinstance(table, Mapping) else table
    out: dict[str, float] = {}
    for name, scale in pairs:
        try:
            label = canonical_label(name)
            out[label] = float(scale)
        except (XRealError, TypeError, ValueError) as error:
            raise XRealError(f"finding guidance {name!r}: {error}") from None
        if label == NO_FINDING:
            raise XRealError("finding guidance: No Finding has no stage 2 to guide")
    return tuple(sorted(out.items()))


DEFAULT_SETTINGS = SamplerSettings()

# Named presets for ``xreal generate --speed``. "fast" holds the xreal evaluate control and fidelity figures of the
# reference settings within their intervals at a twentieth of the UNet evaluations (benchmarks/sampler_quality.py).
# Its stage 1 blends the anatomy latent in for 11 of its 12 steps: fewer leave the anatomy near the backbone's prior
# or, with one free step from higher noise (7 of 8), draw findings nobody asked for on a third of the healthy twins;
# all 12 paste the Anatomy Controller's coarse image in and a request's replicas come out identical (README,
# "Re-chosen for healthy twins without findings"). Its guidance is 5.5, not the reference's 7: with findings kept
# at full contrast on their masks, 7 drew them heavier than the real ones (oedema read as consolidation) and
# 4.5 lost nodules (README, "Findings at full contrast"). Its stage 1 is guided away from every finding the model
# knows (healthy guidance 2): the Fréchet ratio fell from 3.75 to 2.81 and unasked findings from 24% to 21% of the
# finals, held out, for two UNet evaluations per stage-1 step (README, "Healthy twins guided away from findings").
# Its stage 2 is guided finding by finding: each scale is the one of 1.5-7 whose finals came closest to real phantoms
# with that finding (Fréchet distance, 160 requests each, tuning seed 1049) while keeping their detection within 0.03
# of 5.5's; a finding drawn over a large area (heart, fluid, oedema) wants less guidance than a nodule or a
# pneumothorax's edge (README, "Guidance finding by finding").
SPEEDS = {
    "reference": DEFAULT_SETTINGS,
    "fast": SamplerSettings(
        sampler="dpmsolver++",
        steps=12,
        anatomy_steps=11,
        guidance_scale=5.5,
        healthy_guidance_scale=2.0,
    ).with_overrides(
        finding_guidance={
            "Cardiomegaly": 2.5,
            "Pleural Effusion": 2.5,
            "Edema": 2.5,
            "Atelectasis": 3.5,
            "Consolidation": 4.5,
        }
    ),
}
