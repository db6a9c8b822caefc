"""Samplers of XRealPipeline: DDIM (unchanged), DPM-Solver++ 2M, its SDE variant and UniPC; step grids and the
guidance interval; guidance per finding."""

import json

import numpy as np
import pytest
import torch

from xreal.core.errors import XRealError
from xreal.model import sampling
from xreal.phantom import renderer as phantom

SAMPLERS = ["ddim", "dpmsolver++", "dpmsolver++-sde", "unipc"]
STEPS = dict(num_inference_steps=8, anatomy_steps=4)
SEEDS = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def requests():
    cases = phantom.generate(4, 64, seed=7, pathologies=[["Lung Lesion"], [], ["Cardiomegaly"], ["Edema"]])
    masks = [case.pathology_masks[case.labels[0]] if case.pathology_masks else None for case in cases]
    return cases.anatomy, [list(case.labels) for case in cases], SEEDS, masks


@pytest.fixture(scope="module")
def outputs(pipe, requests):
    return {name: pipe(*requests, **STEPS, sampler=name) for name in SAMPLERS}


def _old_denoise(self, latents, z0, keep, blend_steps, context, uncond, guidance_scale, eta, generators, stage, cb):
    """XRealPipeline._denoise as it was before the sampler option (DDIM on the pipeline's scheduler)."""
    guided = uncond is not None and bool((guidance_scale > 1.0).any())
    scale = guidance_scale.clamp(min=1.0).view(-1, 1, 1, 1).to(latents) if guided else None
    for i, t in enumerate(self.scheduler.timesteps):
        if i < blend_steps:
            known = self.scheduler.add_noise(z0, self._noise(generators, z0), t.repeat(len(z0)))
            latents = keep * known + (1.0 - keep) * latents
        if guided:
            eps_uncond, eps_cond = self.unet(
                torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([uncond, context])
            ).sample.chunk(2)
            eps = eps_uncond + scale * (eps_cond - eps_uncond)
        else:
            eps = self.unet(latents, t, encoder_hidden_states=context).sample
        noise = self._noise(generators, latents) if eta > 0 else None
        latents = self.scheduler.step(eps, t, latents, eta=eta, variance_noise=noise).prev_sample
    return latents


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_ddim_default_is_unchanged(pipe, requests, outputs, monkeypatch, eta):
    new = outputs["ddim"] if eta == 1.0 else pipe(*requests, **STEPS, eta=eta)
    assert np.array_equal(pipe(*requests, **STEPS, eta=eta).images, new.images)  # the default is ddim

    def old(self, *args):
        self.scheduler.set_timesteps(STEPS["num_inference_steps"])
        return _old_denoise(self, *args[:11])

    monkeypatch.setattr(sampling.XRealPipeline, "_denoise", old)
    before = pipe(*requests, **STEPS, eta=eta)
    assert np.array_equal(before.images, new.images) and np.array_equal(before.healthy_images, new.healthy_images)


def test_pipeline_scheduler_is_left_alone(pipe, requests):
    config = dict(pipe.scheduler.config)
    timesteps = None if pipe.scheduler.num_inference_steps is None else pipe.scheduler.timesteps.clone()
    pipe(*requests, **STEPS, sampler="dpmsolver++")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and dict(pipe.scheduler.config) == config
    assert (timesteps is None and pipe.scheduler.num_inference_steps is None) or torch.equal(
        timesteps, pipe.scheduler.timesteps
    )


def test_every_sampler_name_has_a_scheduler():
    from xreal.core.settings import SAMPLER_NAMES

    assert tuple(sampling.SAMPLERS) == SAMPLER_NAMES == tuple(SAMPLERS)


def test_unknown_sampler(pipe, requests):
    with pytest.raises(XRealError, match=r"sampler.*'euler'.*ddim, dpmsolver\+\+, dpmsolver\+\+-sde, unipc"):
        pipe(*requests, **STEPS, sampler="euler")


@pytest.fixture(scope="module")
def stage_two(pipe):
    """Inputs of a stage-2 _denoise call for two items."""
    anatomy = np.stack([phantom.anatomy_template(seed, 64) for seed in (1, 2)])
    maps = torch.from_numpy(np.stack([pipe.conditioning_anatomy(a) for a in anatomy]))
    with torch.no_grad():
        z0 = pipe.encode(pipe.vae, pipe.anatomy_prior(maps))
        return z0, pipe.encode_prompt(["Cardiomegaly", "Edema"]), pipe.encode_prompt(["", ""])


def _denoise(pipe, stage_two, sampler, keep, blend_steps, steps=8, eta=1.0):
    z0, context, uncond = stage_two
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    scheduler = pipe.make_scheduler(sampler, steps)
    start = pipe._noise(generators, z0) * scheduler.init_noise_sigma
    guidance = torch.full((2,), 7.0)
    with torch.no_grad():
        return pipe._denoise(
            start, z0, keep, blend_steps, context, uncond, guidance, eta, generators, 2, None, scheduler
        ), scheduler


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_all_keep_returns_the_known_latent(pipe, stage_two, sampler):
    """With keep = 1 everywhere and blending at every step, the output is the known latent: exactly for the
    multistep solvers, whose output is blended with it after their last step (they end at noise level 0); for DDIM
    up to the UNet's error at the noise level of its last step's input, t = 1 (std 0.055), as in the reference.
    Measured at 8 steps: mean |latents - z0| is 0.037 for DDIM (0.18-0.20 for the solvers without the last blend),
    against 0.34-0.83 for plain sampling (z0 is the anatomy prior here)."""
    z0 = stage_two[0]
    latents, scheduler = _denoise(pipe, stage_two, sampler, torch.ones_like(z0[:, :1]), 8)
    free, _ = _denoise(pipe, stage_two, sampler, torch.zeros_like(z0[:, :1]), 0)
    error = (latents - z0).abs().mean().item()
    if sampler == "ddim":
        level = (1.0 - pipe.scheduler.alphas_cumprod[int(scheduler.timesteps[-1])]).sqrt().item()
        assert 0 < error < level
    else:
        assert error == 0.0
    assert (free - z0).abs().mean().item() > 0.3


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_partial_mask_keeps_the_known_region_and_samples_the_rest(pipe, stage_two, sampler):
    """Half known: the known half ends as the known latent (exactly, or DDIM within its last level); the free half
    is sampled, unlike the known latent."""
    z0 = stage_two[0]
    keep = torch.zeros_like(z0[:, :1])
    keep[..., :8, :] = 1.0
    latents, _ = _denoise(pipe, stage_two, sampler, keep, 8)
    known, free = (latents - z0)[..., :8, :].abs().mean().item(), (latents - z0)[..., 8:, :].abs().mean().item()
    assert known == 0.0 if sampler != "ddim" else known < 0.1
    assert free > 0.3


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_all_free_equals_plain_sampling(pipe, stage_two, sampler, monkeypatch):
    """keep = 0 leaves the sample alone. Each blended step still draws its known latent's noise from the items'
    generators, so for the stochastic samplers (ddim with eta 1, the SDE solver) the noise is set to zero to
    compare the same trajectories; deterministic ones are compared with real noise."""
    z0 = stage_two[0]
    eta = 0.0
    if sampler in ("ddim", "dpmsolver++-sde"):
        monkeypatch.setattr(type(pipe), "_noise", lambda self, generators, like: torch.zeros_like(like))
        eta = 1.0
    free, _ = _denoise(pipe, stage_two, sampler, torch.zeros_like(z0[:, :1]), 8, eta=eta)
    plain, _ = _denoise(pipe, stage_two, sampler, torch.zeros_like(z0[:, :1]), 0, eta=eta)
    assert torch.equal(free, plain)
    if sampler == "ddim":  # and deterministic DDIM with real noise
        monkeypatch.undo()
        free, _ = _denoise(pipe, stage_two, sampler, torch.zeros_like(z0[:, :1]), 8, eta=0.0)
        plain, _ = _denoise(pipe, stage_two, sampler, torch.zeros_like(z0[:, :1]), 0, eta=0.0)
        assert torch.equal(free, plain)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_batch_invariance(pipe, requests, outputs, sampler):
    anatomy, prompts, seeds, masks = requests
    together = outputs[sampler]
    for i in range(4):
        alone = pipe(
            anatomy[i : i + 1], prompts[i : i + 1], seeds[i : i + 1], masks[i : i + 1], **STEPS, sampler=sampler
        )
        # The final image is the twin plus the difference of two decodes, so their batch-dependent float rounding
        # (about 1e-5 each) adds up; the twin is one decode.
        np.testing.assert_allclose(alone.images[0], together.images[i], atol=5e-5, rtol=0)
        np.testing.assert_allclose(alone.healthy_images[0], together.healthy_images[i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_outputs_valid_reproducible_and_distinct(pipe, requests, outputs, sampler):
    out = outputs[sampler]
    assert out.images.shape == (4, 64, 64) and out.images.dtype == np.float32
    for images in (out.images, out.healthy_images):
        assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0
    again = pipe(*requests, **STEPS, sampler=sampler)
    assert np.array_equal(again.images, out.images) and np.array_equal(again.healthy_images, out.healthy_images)
    for other in SAMPLERS:
        if other != sampler:
            assert not np.allclose(outputs[other].images, out.images, atol=1e-3)
            assert not np.allclose(outputs[other].healthy_images, out.healthy_images, atol=1e-3)


@pytest.mark.parametrize("corrector_off", [True, False])
def test_unipc_predicts_from_each_blended_sample(pipe, stage_two, corrector_off, monkeypatch):
    """UniPC's corrector replaces the sample entering a step by one rebuilt from the sample before it, which would
    undo the blend made before the step. With the corrector off on blended steps (sampling.step_from_blend), the
    solver steps from exactly the blended sample; left on, it does not (the reason it is off)."""
    if not corrector_off:
        monkeypatch.setattr(sampling, "step_from_blend", lambda scheduler, step: None)
    z0 = stage_two[0]
    keep = torch.zeros_like(z0[:, :1])
    keep[..., :8, :] = 1.0  # the top half known
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    scheduler = pipe.make_scheduler("unipc", 8)
    step, entering, kept = scheduler.step, [], []

    def recording(model_output, timestep, sample, **kwargs):
        entering.append(sample.clone())
        out = step(model_output, timestep, sample, **kwargs)
        kept.append(scheduler.last_sample.clone())  # what the predictor stepped from
        return out

    scheduler.step = recording
    start = pipe._noise(generators, z0) * scheduler.init_noise_sigma
    with torch.no_grad():
        pipe._denoise(start, z0, keep, 8, *stage_two[1:], torch.full((2,), 7.0), 1.0, generators, 2, None, scheduler)
    same = [torch.equal(a, b) for a, b in zip(entering, kept, strict=True)]
    assert same[0]  # step 0 has nothing to correct
    assert all(same) if corrector_off else not any(same[1:])


def test_guidance_interval(pipe, requests, outputs):
    """The full interval is the default; a shorter one skips the unconditional pass outside it, and changes the
    image. Counted UNet evaluations match SamplerSettings.unet_evaluations."""
    from xreal.core.settings import SamplerSettings

    full = pipe(*requests, **STEPS, guidance_interval=(0.0, 1.0))
    assert np.array_equal(full.images, outputs["ddim"].images)
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    try:
        half = pipe(*requests, **STEPS, guidance_interval=(0.0, 0.5))
    finally:
        hook.remove()
    assert np.array_equal(half.healthy_images, full.healthy_images)
    pathology = [m is not None for m in requests[3]]
    assert not np.allclose(half.images[pathology], full.images[pathology], atol=1e-3)
    settings = SamplerSettings(steps=8, anatomy_steps=4, guidance_interval=(0.0, 0.5))
    assert sum(calls) == sum(settings.unet_evaluations(p) for p in pathology) == 4 * 8 + 3 * (8 + 4)
    with pytest.raises(XRealError, match="guidance_interval"):
        pipe(*requests, **STEPS, guidance_interval=(0.5, 0.5))


def test_healthy_guidance(pipe, requests, outputs):
    """Off by default (the reference's twins, unchanged). On, every stage-1 step runs the UNet twice, the
    unconditional half on the prompt naming every finding the model knows, and the twins change; counted UNet
    evaluations match SamplerSettings.unet_evaluations."""
    from xreal.core.labels import NO_FINDING
    from xreal.core.settings import SamplerSettings

    assert np.array_equal(pipe(*requests, **STEPS, healthy_guidance_scale=1.0).images, outputs["ddim"].images)
    findings = pipe.findings_prompt()
    assert NO_FINDING not in findings and all(label in findings for label in pipe.config.labels if label != NO_FINDING)
    negative = pipe.encode_prompt([findings])[0]
    calls = []

    def record(module, args, kwargs):
        calls.append((len(args[0]), kwargs["encoder_hidden_states"]))

    hook = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        guided = pipe(*requests, **STEPS, healthy_guidance_scale=3.0)
    finally:
        hook.remove()
    stage_one = calls[: STEPS["num_inference_steps"]]
    assert all(n == 2 * len(SEEDS) for n, _ in stage_one)
    assert all(torch.equal(context[: len(SEEDS)], negative.expand(len(SEEDS), -1, -1)) for _, context in stage_one)
    assert not np.allclose(guided.healthy_images, outputs["ddim"].healthy_images, atol=1e-3)
    pathology = [m is not None for m in requests[3]]
    settings = SamplerSettings(steps=8, anatomy_steps=4, healthy_guidance_scale=3.0)
    assert sum(n for n, _ in calls) == sum(settings.unet_evaluations(p) for p in pathology) == 4 * 16 + 3 * 16
    with pytest.raises(XRealError, match="healthy guidance"):
        SamplerSettings(healthy_guidance_scale=-1.0).check()


@pytest.mark.parametrize("steps, expected", [(30, 31), (60, 63), (100, 100), (8, 8)])
def test_reference_step_grid(pipe, steps, expected):
    """The reference's DDIM grid: every 1000 // steps from t = 1; DDIM's own step then goes back the same way."""
    from xreal.core.settings import SamplerSettings

    scheduler = pipe.make_scheduler("ddim", steps, step_grid="reference")
    ratio = 1000 // steps
    assert scheduler.timesteps.tolist() == list(range(1 + ratio * (expected - 1), 0, -ratio))
    assert scheduler.config.num_train_timesteps // scheduler.num_inference_steps == ratio
    assert SamplerSettings(steps=steps, anatomy_steps=0, step_grid="reference").steps_run == expected
    exact = pipe.make_scheduler("ddim", steps)
    assert len(exact.timesteps) == steps
    with pytest.raises(XRealError, match=r"reference step grid.*DDIM"):
        pipe.make_scheduler("unipc", steps, step_grid="reference")


@pytest.mark.parametrize("steps", [3, 9, 37])
def test_a_reference_grid_past_the_last_training_step_is_refused(pipe, steps):
    """At 3 steps the reference's grid is 1, 334, 667, 1000: t = 1000 has no noise level (the reference fails)."""
    from xreal.core.settings import SamplerSettings

    with pytest.raises(XRealError, match=f"reference step grid at {steps} steps reaches t = 1000"):
        pipe.make_scheduler("ddim", steps, step_grid="reference")
    with pytest.raises(XRealError, match="reaches t = 1000"):
        SamplerSettings(steps=steps, anatomy_steps=0, step_grid="reference").check()


def test_finding_guidance_sets_each_requests_stage_two_guidance():
    """A request takes its finding's scale from the table, the largest of its findings' when it asks for several,
    the base scale for a finding the table leaves out; a healthy request has no stage 2 to guide."""
    from xreal.core.settings import SamplerSettings

    settings = SamplerSettings(guidance_scale=5.0).with_overrides(finding_guidance={"edema": 3, "Lung Lesion": 7})
    assert settings.finding_guidance == (("Edema", 3.0), ("Lung Lesion", 7.0))
    assert settings.for_labels(["Edema"]).guidance_scale == 3.0
    assert settings.for_labels(["Pneumothorax"]).guidance_scale == 5.0
    assert settings.for_labels(["Edema", "Pneumothorax"]).guidance_scale == 5.0
    assert settings.for_labels(["Edema", "Lung Lesion"]).guidance_scale == 7.0
    assert settings.for_labels(["No Finding"]) == settings
    asked = [["Edema"], ["No Finding"], ["Lung Lesion", "Edema"]]
    assert settings.pipeline_arguments(asked)["guidance_scale"] == [3.0, 5.0, 7.0]
    assert settings.pipeline_arguments()["guidance_scale"] == 5.0


def test_one_guidance_scale_given_alone_drops_the_finding_table():
    """An override of the scale alone means one scale for every request (a manifest row's, a run's
    --guidance-scale); given with a table, both hold, as a run record gives them back."""
    from xreal.core.settings import DEFAULT_SETTINGS, SPEEDS, SamplerSettings

    settings = SamplerSettings().with_overrides(finding_guidance={"Edema": 3})
    assert settings.with_overrides(guidance_scale=4).for_labels(["Edema"]).guidance_scale == 4.0
    assert settings.with_overrides(steps=20).for_labels(["Edema"]).guidance_scale == 3.0
    for preset in (settings, SPEEDS["fast"]):
        assert DEFAULT_SETTINGS.with_overrides(**preset.to_dict()) == preset  # the flow's parameters
        assert json.loads(json.dumps(preset.to_dict())) == preset.to_dict()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"Oedema": 3}, "finding guidance 'Oedema': unknown pathology label"),
        ({"No Finding": 3}, "No Finding has no stage 2"),
        ({"Edema": "strong"}, "finding guidance 'Edema': could not convert"),
    ],
)
def test_a_bad_finding_table_is_refused_naming_the_entry(table, message):
    from xreal.core.settings import SamplerSettings

    with pytest.raises(XRealError, match=message):
        SamplerSettings().with_overrides(finding_guidance=table)


def test_a_finding_scale_out_of_range_is_refused():
    from xreal.core.settings import SamplerSettings

    with pytest.raises(XRealError, match="the guidance for Edema must lie in"):
        SamplerSettings().with_overrides(finding_guidance={"Edema": 60}).check()
