"""Importing the published XReal checkpoints: layout coverage, module equivalence and two-stage sampling.

The checkpoints here are built in the reference's key layout and shapes by
``tests/reference_layout.py`` at a reduced width, with random weights, and
saved the way Lightning saves them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from tests import reference_layout as ref
from tests.benchmark_loader import load_benchmark
from xreal.core.labels import Anatomy
from xreal.core.settings import SPEEDS
from xreal.model.bundle import (
    PRESETS,
    build_autoencoder,
    build_text_encoder,
    build_unet,
    load_pipeline,
    reference_scheduler,
    verify_bundle,
)
from xreal.model.reference import (
    Checkpoint,
    ReferenceImportError,
    autoencoder_state,
    check_schedule,
    import_reference,
    read_checkpoint,
    reference_preset,
    text_encoder_state,
    unet_state,
)
from xreal.model.reference_sampler import ReferenceParts, ddim_parameters, reference_sample

LAYOUT = Path(__file__).parent / "data" / "reference_paper_layout.json"
WORDS = ["no", "finding", "cardiomegaly", "edema", "pleural", "effusion", "lung", "opacity", "atelectasis"]
# The reduced width: the layout does not depend on it (GroupNorm32 needs multiples of 32).
UNET = dict(
    model_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_resolutions=(8, 4, 2), context_dim=64
)
AE = dict(ch=32, ch_mult=(1, 2, 4), num_res_blocks=2)
IMAGE = 64


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest difference, relative to the largest value expected."""
    return float((got - expected).abs().max().detach() / expected.abs().max().detach())


def write_vocab(folder: Path) -> Path:
    """A BERT WordPiece vocabulary in bert-base-uncased's form ([PAD] 0, specials, words, pieces)."""
    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *letters, *(f"##{c}" for c in letters)]
    (folder / "vocab.txt").write_text("\n".join(pieces) + "\n")
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Reference-layout modules with random weights, and their checkpoints on disk."""
    folder = tmp_path_factory.mktemp("reference")
    tokenizer = write_vocab(folder / "bert")
    vocab = len((tokenizer / "vocab.txt").read_text().split())
    torch.manual_seed(0)
    unet = ref.randomize(ref.UNetModel(**UNET), 1)
    first_stage = ref.randomize(ref.AutoencoderKL(**AE), 2, scale=0.1)
    text = ref.randomize(ref.TransformerWrapper(vocab, 16, 64, 2), 3)
    controller = ref.randomize(ref.AutoencoderKL(**AE), 4, scale=0.1)
    backbone = ref.ReferenceBackbone(unet, first_stage, text)
    ema = {name: p.detach() + 0.01 for name, p in unet.named_parameters()}
    torch.save({"state_dict": backbone.checkpoint(ema), "epoch": 7, "global_step": 12345}, folder / "backbone.pth")
    losses = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4)}
    controller_state = {**controller.state_dict(), **losses}
    torch.save({"state_dict": controller_state, "epoch": 3}, folder / "anatomy_controller.pth")
    torch.save({"state_dict": first_stage.state_dict()}, folder / "ldm_ae.pth")
    return {
        "folder": folder,
        "tokenizer": tokenizer,
        "unet": unet,
        "first_stage": first_stage,
        "text": text,
        "controller": controller,
        "ema": ema,
    }


@pytest.fixture(scope="module")
def bundle(reference, tmp_path_factory):
    folder = reference["folder"]
    out = tmp_path_factory.mktemp("bundles") / "xreal-reference"
    result = import_reference(
        folder / "backbone.pth",
        folder / "anatomy_controller.pth",
        out,
        autoencoder=folder / "ldm_ae.pth",
        tokenizer=reference["tokenizer"],
        image_size=IMAGE,
    )
    return result


# --- the full-size layout --------------------------------------------------------------


def _stand_in(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Tensors of the listed shapes, each on its own 4-byte storage (stride 0): the layout without the memory."""
    return {k: torch.zeros(1).as_strided(tuple(s), (0,) * len(s)) for k, s in shapes.items()}


def test_reference_layout_is_the_papers():
    """The test modules at the paper's sizes have exactly the reference's parameter names and shapes."""
    layout = json.loads(LAYOUT.read_text())
    with torch.device("meta"):
        backbone = ref.ReferenceBackbone(ref.UNetModel(), ref.AutoencoderKL(), ref.TransformerWrapper())
        controller = ref.AutoencoderKL()
    ours = {k: list(v.shape) for k, v in backbone.checkpoint().items()}
    assert ours == layout["backbone"]
    model_part = {k: v for k, v in layout["anatomy_controller"].items() if not k.startswith("loss.")}
    assert {k: list(v.shape) for k, v in controller.state_dict().items()} == model_part


def test_importer_covers_the_paper_layout():
    """Every key of the full-size reference checkpoints is mapped or reported, onto the paper preset's shapes."""
    layout = json.loads(LAYOUT.read_text())
    backbone = Checkpoint(Path("backbone.pth"), {**_stand_in(layout["backbone"]), **ref.ddpm_schedule_buffers()})
    controller = Checkpoint(Path("anatomy_controller.pth"), _stand_in(layout["anatomy_controller"]))
    preset, vocab = reference_preset(backbone, controller)
    assert preset == PRESETS["paper"] and vocab == 30522
    with torch.device("meta"):
        unet, text = build_unet(preset), build_text_encoder(preset, vocab)
        vae, anatomy = build_autoencoder(preset), build_autoencoder(preset)
    pairs = [
        (unet, unet_state(backbone, unet)),
        (text, text_encoder_state(backbone)),
        (vae, autoencoder_state(backbone, "first_stage_model.", vae)),
        (anatomy, autoencoder_state(controller, "", anatomy)),
    ]
    for module, state in pairs:
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in state.items()} == expected
    check_schedule(backbone, reference_scheduler())
    controller.ignore(controller.keys("loss."), "losses")
    assert backbone.unaccounted() == [] and controller.unaccounted() == []
    assert sum(p.numel() for p in unet.parameters()) == sum(
        int(np.prod(s)) for k, s in layout["backbone"].items() if k.startswith("model.diffusion_model.")
    )


# --- module equivalence --------------------------------------------------------------


def test_import_writes_a_verified_bundle_and_reports_every_key(reference, bundle):
    record = verify_bundle(bundle.bundle)
    umask = os.umask(0)
    os.umask(umask)
    assert bundle.bundle.stat().st_mode & 0o777 == 0o777 & ~umask  # an ordinary folder, not a private temp one
    assert record["value_range"] == [0.0, 1.0] and record["training"]["licence"] == "CC BY-NC 4.0"
    backbone, controller, separate = bundle.checkpoints
    assert backbone.unaccounted() == [] and controller.unaccounted() == [] and separate.unaccounted() == []
    ignored = {reason.split(" (")[0]: len(keys) for reason, keys in backbone.ignored.items()}
    n_unet = len(reference["unet"].state_dict())
    assert ignored["the UNet's EMA copy"] == n_unet
    assert ignored["EMA bookkeeping"] == 2
    assert ignored["the text transformer's token-prediction head"] == 2
    assert len(backbone.used) == len(backbone.tensors) - n_unet - 4
    assert {r.split(" (")[0] for r in controller.ignored} == {"training losses"}
    assert backbone.metadata == {"epoch": 7, "global_step": 12345}
    assert "identical to the backbone's first-stage autoencoder" in bundle.summary()
    card = (bundle.bundle / "MODEL_CARD.md").read_text()
    assert "CC BY-NC 4.0" in card
    # Safetensors only: nothing pickled was copied into the bundle.
    assert not [p for p in bundle.bundle.rglob("*") if p.suffix in (".pth", ".bin", ".pt", ".ckpt")]


@pytest.fixture(scope="module")
def imported(bundle):
    return load_pipeline(bundle.bundle, dtype=torch.float64)


def test_unet_computes_what_the_reference_computes(reference, imported):
    unet = reference["unet"].double()
    generator = torch.Generator().manual_seed(5)
    for t in (1, 500, 991):
        x = torch.randn(2, 3, 16, 16, generator=generator, dtype=torch.float64)
        context = torch.randn(2, 16, 64, generator=generator, dtype=torch.float64)
        expected = unet(x, torch.full((2,), t), context)
        got = imported.unet(x, t, encoder_hidden_states=context).sample
        assert relative_error(got, expected) < 1e-12, t
    reference["unet"].float()


def test_autoencoders_compute_what_the_reference_computes(reference, imported):
    generator = torch.Generator().manual_seed(6)
    images = torch.rand(2, 3, IMAGE, IMAGE, generator=generator, dtype=torch.float64)
    for ours, theirs in (
        (imported.vae, reference["first_stage"]),
        (imported.anatomy_controller, reference["controller"]),
    ):
        theirs = theirs.double()
        mean, std = theirs.encode(images)
        posterior = ours.encode(images).latent_dist
        assert relative_error(posterior.mean, mean) < 1e-12 and relative_error(posterior.std, std) < 1e-12
        assert relative_error(ours.decode(mean).sample, theirs.decode(mean)) < 1e-12
        theirs.float()


def test_text_encoder_computes_what_the_reference_computes(reference, imported):
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(str(reference["tokenizer"]))  # what the reference calls
    prompts = ["", "Cardiomegaly", "Pleural Effusion Edema"]
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=16, return_tensors="pt").input_ids
    assert ids[0, 0] == tokenizer.cls_token_id and ids[0, 2] == 0  # [CLS] [SEP] [PAD]...
    expected = reference["text"].double()(ids)
    assert relative_error(imported.encode_prompt(prompts), expected) < 1e-12
    reference["text"].float()


def test_scheduler_takes_the_reference_ddim_steps(imported):
    scheduler = imported.scheduler
    scheduler.set_timesteps(100)
    timesteps, alphas, previous, _ = ddim_parameters(ref.ddpm_schedule_buffers()["alphas_cumprod"], 100, 1.0)
    assert scheduler.timesteps.tolist() == timesteps.flip(0).tolist() == list(range(991, 0, -10))
    ours = scheduler.alphas_cumprod
    assert torch.allclose(ours[timesteps], alphas, rtol=1e-5)
    assert float(scheduler.final_alpha_cumprod) == pytest.approx(float(previous[0]), rel=1e-5)


def test_ema_weights_on_request(reference, tmp_path):
    folder = reference["folder"]
    result = import_reference(
        folder / "backbone.pth",
        folder / "anatomy_controller.pth",
        tmp_path / "ema",
        tokenizer=reference["tokenizer"],
        ema=True,
        image_size=IMAGE,
    )
    unet = UNet2DConditionModel.from_pretrained(result.bundle / "unet")
    expected = reference["ema"]["input_blocks.0.0.weight"]
    assert torch.equal(unet.conv_in.weight, expected)
    assert any(r.startswith("the UNet's live weights") for r in result.checkpoints[0].ignored)


# --- two-stage sampling, step by step ---------------------------------------------------

# Reference grey levels of the Anatomy Controller's input, written out independently of the importer.
REFERENCE_LEVELS = {Anatomy.BACKGROUND: 0.0, Anatomy.RIGHT_LUNG: 0.5, Anatomy.LEFT_LUNG: 0.25, Anatomy.HEART: 0.75}
# float32: the largest latent difference at any step, relative to the largest latent value, measured 2-3e-6 at
# 20 + 20 steps (summation order: guidance batched against two passes, fused q/k/v); images the same.
TOLERANCE = 2e-5


def reference_parts(reference) -> ReferenceParts:
    """The reference-layout modules as the reference's sampler calls them."""
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(str(reference["tokenizer"]))
    first_stage, controller, unet, text = (reference[k] for k in ("first_stage", "controller", "unet", "text"))

    def embed(prompt: str) -> torch.Tensor:
        ids = tokenizer([prompt], padding="max_length", truncation=True, max_length=16, return_tensors="pt")
        return text(ids.input_ids)

    return ReferenceParts(
        unet=unet,
        encode=first_stage.encode,
        decode=first_stage.decode,
        anatomy_controller=lambda x: controller.decode(controller.encode(x)[0]),
        text=embed,
        alphas_cumprod=ref.ddpm_schedule_buffers()["alphas_cumprod"],
    )


def masks_at(latent: int = 16, factor: int = IMAGE // 16):
    """An anatomy label map and a pathology mask made of whole latent cells, so every resize rule agrees."""
    labels = np.zeros((latent, latent), dtype=np.uint8)
    labels[2:12, 2:7] = Anatomy.RIGHT_LUNG
    labels[2:12, 9:14] = Anatomy.LEFT_LUNG
    labels[7:12, 6:11] = Anatomy.HEART
    pathology = np.zeros((latent, latent), dtype=bool)
    pathology[8:12, 6:10] = True
    block = np.ones((factor, factor), dtype=np.uint8)
    return labels, np.kron(labels, block), pathology, np.kron(pathology, block).astype(bool)


@pytest.mark.parametrize("seed, steps", [(0, 30), (1, 60)])
def test_two_stage_sampling_matches_the_reference_step_by_step(reference, bundle, seed, steps):
    """At 30 and 60 steps, which do not divide 1000, the reference runs 31 and 63 DDIM steps: so does the pipeline
    on the reference step grid. (For step counts that divide 1000 the exact grid is the same: test_samplers.)"""
    pipeline = load_pipeline(bundle.bundle)
    labels16, labels, pathology16, pathology = masks_at()
    anatomy_steps = steps // 2
    ours: list[torch.Tensor] = []

    def keep(pipe, step, timestep, kwargs):
        ours.append(kwargs["latents"].clone())

    output = pipeline(
        anatomy=[labels],
        prompts=["Cardiomegaly"],
        seeds=[seed],
        pathology_masks=[pathology],
        num_inference_steps=steps,
        anatomy_steps=anatomy_steps,
        restore_outside=False,
        step_grid="reference",
        callback_on_step_end=keep,
    )

    levels = np.vectorize(lambda a: REFERENCE_LEVELS[Anatomy(a)])(labels).astype(np.float32)
    theirs = reference_sample(
        reference_parts(reference),
        anatomy_image=torch.from_numpy(levels)[None, None].expand(1, 3, -1, -1),
        anatomy_mask=torch.from_numpy(np.where(labels16 > 0, 1.0, 0.2)).float()[None, None],
        pathology_mask=torch.from_numpy(pathology16).float()[None, None],
        prompt="Cardiomegaly",
        generator=torch.Generator().manual_seed(seed),
        steps=steps,
        anatomy_steps=anatomy_steps,
    )
    assert len(ours) == len(theirs.trace) == 2 * {30: 31, 60: 63}[steps]
    errors = [relative_error(a, b) for a, b in zip(ours, theirs.trace, strict=True)]
    assert max(errors) < TOLERANCE, errors
    assert np.abs(output.healthy_images[0] - theirs.healthy[0].mean(0).numpy()).max() < TOLERANCE
    assert np.abs(output.images[0] - theirs.image[0].mean(0).numpy()).max() < TOLERANCE
    # Stage 2 did something, mostly where it was free to (random weights also move the rest a little).
    changed = np.abs(output.images[0] - output.healthy_images[0])
    assert changed[pathology].mean() > 0.05 and changed[pathology].mean() > 2 * changed[~pathology].mean()


# --- what the importer refuses ---------------------------------------------------------


class TrainerConfig:  # stands for the Python objects Lightning pickles next to the weights
    lr = 1e-4


def rewrite(reference, tmp_path, name="backbone.pth", change=None, extra=None):
    """A copy of a reference checkpoint with ``change(state)`` applied."""
    loaded = torch.load(reference["folder"] / name, weights_only=True)
    state = dict(loaded["state_dict"])
    if change:
        change(state)
    path = tmp_path / name
    torch.save({**loaded, "state_dict": state, **(extra or {})}, path)
    return path


def import_with(reference, tmp_path, backbone=None, **options):
    folder = reference["folder"]
    return import_reference(
        backbone or folder / "backbone.pth",
        options.pop("anatomy_controller", folder / "anatomy_controller.pth"),
        options.pop("out", tmp_path / "bundle"),
        tokenizer=options.pop("tokenizer", reference["tokenizer"]),
        image_size=options.pop("image_size", IMAGE),
        **options,
    )


def test_refuses_a_checkpoint_that_would_run_code(reference, tmp_path):
    path = rewrite(reference, tmp_path, extra={"hyper_parameters": TrainerConfig()})
    with pytest.raises(ReferenceImportError, match=r"TrainerConfig\), which torch.load\(weights_only=True\)") as error:
        read_checkpoint(path)
    assert "torch.save(c.get('state_dict', c)" in str(error.value) and str(path) in str(error.value)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ReferenceImportError, match=r"junk\.pth: not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "junk.pth")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda s: s.pop("model.diffusion_model.out.2.weight"),
            "UNet: no weight in the checkpoint for: conv_out.weight",
        ),
        (
            lambda s: s.update({"model.diffusion_model.out.2.weight": torch.zeros(3, 32, 1, 1)}),
            r"wrong shape: conv_out.weight \(3, 32, 1, 1\) \(expected \(3, 32, 3, 3\)\)",
        ),
        (lambda s: s.update({"model.diffusion_model.extra.weight": torch.zeros(2)}), "model.diffusion_model.extra"),
        (lambda s: s.update({"cond_stage_model.something": torch.zeros(2)}), "no part of the reference layout"),
        (lambda s: s.pop("cond_stage_model.transformer.attn_layers.layers.1.1.net.2.bias"), "blocks.0.ff.2.bias"),
        (lambda s: s.update({"betas": s["betas"] * 1.1}), "betas differs from the reference schedule"),
        (lambda s: s.pop("alphas_cumprod"), "missing the schedule buffer alphas_cumprod"),
    ],
)
def test_refuses_what_is_not_the_reference_layout_and_writes_nothing(reference, tmp_path, change, message):
    backbone = rewrite(reference, tmp_path, change=change)
    with pytest.raises(ReferenceImportError, match=message):
        import_with(reference, tmp_path, backbone)
    assert not (tmp_path / "bundle").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]  # no staging left behind


def test_keeps_an_existing_folder_and_checks_the_tokenizer(reference, tmp_path):
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "mine.txt").write_text("keep")
    with pytest.raises(ReferenceImportError, match="already exists"):
        import_with(reference, tmp_path)
    assert (tmp_path / "bundle" / "mine.txt").read_text() == "keep"
    bigger = write_vocab(tmp_path / "bert")
    (bigger / "vocab.txt").write_text((bigger / "vocab.txt").read_text() + "extra\n")
    with pytest.raises(ReferenceImportError, match="has 67 tokens but the text encoder embeds 66"):
        import_with(reference, tmp_path, out=tmp_path / "other", tokenizer=bigger)
    with pytest.raises(ReferenceImportError, match=r"nothing-here': no such folder; .* --tokenizer"):
        import_with(reference, tmp_path, out=tmp_path / "other", tokenizer=tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReferenceImportError, match=r"empty: holds no vocab\.txt or tokenizer\.json"):
        import_with(reference, tmp_path, out=tmp_path / "other", tokenizer=tmp_path / "empty")
    with pytest.raises(ReferenceImportError, match=r"image size 66 is not a multiple of .* factor 4"):
        import_with(reference, tmp_path, out=tmp_path / "other", image_size=66)
    assert not (tmp_path / "other").exists()


def test_separate_autoencoder(reference, tmp_path):
    """ldm_ae.pth fills in a backbone without a first stage, and is checked against one that has it."""
    without = rewrite(
        reference, tmp_path, change=lambda s: [s.pop(k) for k in list(s) if k.startswith("first_stage_model.")]
    )
    with pytest.raises(ReferenceImportError, match=r"--autoencoder ldm_ae\.pth"):
        import_with(reference, tmp_path, without)
    result = import_with(reference, tmp_path, without, autoencoder=reference["folder"] / "ldm_ae.pth")
    vae = load_pipeline(result.bundle).vae
    assert torch.equal(vae.encoder.conv_in.weight, reference["first_stage"].encoder.conv_in.weight)
    other = rewrite(
        reference, tmp_path, "ldm_ae.pth", change=lambda s: s.update({"quant_conv.bias": s["quant_conv.bias"] + 1})
    )
    result = import_with(reference, tmp_path, out=tmp_path / "b2", autoencoder=other)
    assert "differs from the backbone's first-stage autoencoder" in result.summary()
    assert torch.equal(load_pipeline(result.bundle).vae.quant_conv.bias, reference["first_stage"].quant_conv.bias)


def test_the_reference_loop_runs_on_the_imported_bundle(reference, bundle):
    """ReferenceParts.from_pipeline (the benchmark's baseline) gives the reference modules' result."""
    pipeline = load_pipeline(bundle.bundle)
    labels16, labels, pathology16, _ = masks_at()
    levels = np.vectorize(lambda a: REFERENCE_LEVELS[Anatomy(a)])(labels).astype(np.float32)
    inputs = dict(
        anatomy_image=torch.from_numpy(levels)[None, None].expand(1, 3, -1, -1),
        anatomy_mask=torch.from_numpy(np.where(labels16 > 0, 1.0, 0.2)).float()[None, None],
        pathology_mask=torch.from_numpy(pathology16).float()[None, None],
        prompt="Edema",
        steps=6,
        anatomy_steps=3,
    )
    ours = reference_sample(
        ReferenceParts.from_pipeline(pipeline), generator=torch.Generator().manual_seed(3), **inputs
    )
    theirs = reference_sample(reference_parts(reference), generator=torch.Generator().manual_seed(3), **inputs)
    assert relative_error(ours.image, theirs.image) < TOLERANCE
    assert max(relative_error(a, b) for a, b in zip(ours.trace, theirs.trace, strict=True)) < TOLERANCE


@pytest.mark.slow
def test_import_and_generate_from_the_command_line(reference, prefect_api, tmp_path):
    """A user's path: xreal import-reference, xreal verify, then xreal generate with the bundle."""
    from click.testing import CliRunner

    from tests.test_generate_flow import manifest
    from xreal.cli import cli
    from xreal.model.bundle import DEMO_BUNDLE

    folder, out = reference["folder"], tmp_path / "models" / "xreal-reference"
    runner = CliRunner()
    checkpoints = ["--backbone", folder / "backbone.pth", "--anatomy-controller", folder / "anatomy_controller.pth"]
    command = ["import-reference", *checkpoints, "--tokenizer", reference["tokenizer"], "--image-size", IMAGE]
    imported = runner.invoke(cli, [str(a) for a in [*command, "--out", out]])
    assert imported.exit_code == 0, imported.output
    assert "anatomy_controller.pth: 204 of 206 keys used" in imported.output
    assert "not used: 2 keys, the text transformer's token-prediction head" in imported.output
    assert "CC BY-NC 4.0" in imported.output
    assert runner.invoke(cli, ["verify", "--model", str(out)]).exit_code == 0
    again = runner.invoke(cli, [str(a) for a in [*command, "--out", out]])
    assert again.exit_code == 2 and "already exists" in again.output

    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"version: 1\njudges: {DEMO_BUNDLE / 'judges'}\nclassifier: {{enabled: false}}\n"
        "anatomy: {enabled: false}\nrealism: {enabled: false}\nsanity: {enabled: false}\n"
    )
    requests = manifest(tmp_path / "m.parquet", samples=1, steps={"steps": 4, "anatomy_steps": 2})
    run = runner.invoke(
        cli, ["generate", str(requests), "--out", str(tmp_path / "run"), "--model", str(out), "--policy", str(policy)]
    )
    assert run.exit_code == 0, run.output
    record = json.loads((tmp_path / "run" / "dataset.json").read_text())
    assert record["model"]["path"] == str(out) and record["model"]["preset"] == "reference"
    assert record["model"]["licence"] == "CC BY-NC 4.0"
    assert len(list((tmp_path / "run").rglob("*.png"))) >= 3


def test_paper_preset_benchmark_runs(tmp_path):
    """The GPU ladder's CPU path at the demo sizes (seconds; it measures, this only runs it): every rung that runs
    on a CPU prints a row, the CUDA-graphs rung says it was skipped. The compile rung is left out: compiling the
    UNet on a CPU takes minutes (its fast-preset row then runs on rung 5's configuration). Warm-up at one step: the
    bf16 rungs are slow on a CPU without bf16 instructions."""
    import math
    import subprocess
    import sys

    script = Path(__file__).parents[1] / "benchmarks" / "paper_preset.py"
    options = ["--preset", "demo", "--steps", "2", "--images", "1", "--batch", "1", "--repeats", "1"]
    options += ["--warmup-steps", "1"]
    options += ["--rungs", "1,2,3,4,5,7,8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, script, *options], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[1]: line.split()[2:] for line in done.stdout.splitlines() if line[:1].isdigit()}
    ran = ["reference", "batched", "sdpa", "bf16", "channels-last", "fast"]
    assert sorted(rows) == sorted([*ran, "cuda-graphs"]), done.stdout
    for name in ran:
        ratio = float(rows[name][2].rstrip("x"))
        assert math.isfinite(ratio) and ratio > 0, done.stdout
    assert rows["reference"][2] == "1.00x", done.stdout
    assert " ".join(rows["cuda-graphs"]) == "skipped (CUDA only)", done.stdout
    # Rungs 1-5 run the same UNet evaluations per image (the reference's grid); the fast preset its own.
    assert {rows[name][4] for name in ran[:-1]} == {"6"}, done.stdout
    fast = SPEEDS["fast"]
    assert f"{fast.sampler} {fast.steps}+{fast.steps}" in " ".join(rows["fast"]), done.stdout


def test_paper_preset_fast_rung_runs_on_the_configuration_asked_for():
    """By default the fast preset runs on the highest batched rung selected; ``--fast-on`` picks another (on an H200
    bf16 without channels_last is the fastest); a rung that is not batched, or does not run here, or more than one
    rung, is refused."""
    paper_preset = load_benchmark("paper_preset")
    cpu, gpu = paper_preset.Context(False, "default"), paper_preset.Context(True, "max-autotune-no-cudagraphs")
    names = paper_preset.select("all")

    default = paper_preset.ladder(names, cpu)["fast"]
    assert default.fast and default.compile_mode == "default" and default.channels_last
    assert default.on == "on rung 6's configuration"
    assert paper_preset.ladder(names, gpu)["fast"].compile_mode == "max-autotune"  # rung 7: CUDA graphs

    on_bf16 = paper_preset.ladder(names, gpu, fast_on="bf16")["fast"]
    assert on_bf16.autocast is torch.bfloat16 and on_bf16.attention == "sdpa" and on_bf16.batched
    assert not on_bf16.channels_last and on_bf16.compile_mode is None and on_bf16.fast
    assert on_bf16.on == "on rung 4's configuration"
    for refused in ("reference", "cuda-graphs"):
        with pytest.raises(SystemExit, match=f"--fast-on {refused}: not a batched rung"):
            paper_preset.ladder(names, cpu, fast_on=refused)

    import subprocess
    import sys

    script = Path(__file__).parents[1] / "benchmarks" / "paper_preset.py"
    done = subprocess.run([sys.executable, script, "--fast-on", "4,5"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--fast-on 4,5: name one rung" in done.stderr, done.stderr


def test_reads_the_old_non_zip_format(tmp_path):
    state = {"state_dict": {"quant_conv.bias": torch.arange(6.0)}, "epoch": 2}
    torch.save(state, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    checkpoint = read_checkpoint(tmp_path / "old.pth")
    assert torch.equal(checkpoint.tensors["quant_conv.bias"], torch.arange(6.0)) and checkpoint.metadata == {"epoch": 2}
