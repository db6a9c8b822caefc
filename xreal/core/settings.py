"""Sampler settings shared by the manifest, the audit and the sampler."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class SamplerSettings:
    """Two-stage XReal sampling settings; defaults are the reference implementation's."""

    steps: int = 100
    anatomy_steps: int = 50
    guidance_scale: float = 7.0
    soft_scale: float = 0.2
    eta: float = 1.0

    def with_overrides(self, **overrides: float | int | None) -> SamplerSettings:
        """A copy with the non-None overrides applied."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def unet_evaluations(self, has_pathology: bool) -> int:
        """UNet calls for one sample: stage 1, plus stage 2 (doubled by guidance) unless No Finding."""
        stage2 = self.steps * (2 if self.guidance_scale > 1.0 else 1) if has_pathology else 0
        return self.steps + stage2


DEFAULT_SETTINGS = SamplerSettings()
