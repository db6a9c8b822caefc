import copy
import json

import numpy as np
import pytest
import torch

from xreal.core.masks import read_binary_mask, resize_mask
from xreal.data.training_index import read_training_index, write_phantom_training_set
from xreal.model.bundle import build_autoencoder, get_preset
from xreal.model.training import (
    TrainingRun,
    continue_with_findings,
    draw_chances,
    finding_weights,
    load_training_set,
    train_autoencoder,
    train_backbone,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantom")
    write_phantom_training_set(folder, count=24, size=64, seed=2)
    return load_training_set(folder, size=32, split=None)


def test_training_set_is_read_at_the_preset_size(data):
    assert data.images.shape == (24, 3, 32, 32) and data.label_maps.shape == (24, 32, 32)
    assert data.images.min() >= -1.0 and data.images.max() <= 1.0
    assert set(data.label_maps.unique().tolist()) == {0, 1, 2, 3}
    assert "" in data.prompts and any(p for p in data.prompts)


def states_equal(a, b):
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_autoencoder_training_learns_and_resumes_exactly(data, tmp_path):
    straight = train_autoencoder(
        data, TrainingRun(tmp_path / "a", steps=6, batch_size=4, checkpoint_every=3), preset="tiny"
    )
    first = TrainingRun(tmp_path / "b", steps=3, batch_size=4, checkpoint_every=3, preview_every=3)
    train_autoencoder(data, first, preset="tiny")
    resumed_run = TrainingRun(tmp_path / "b", steps=6, batch_size=4, checkpoint_every=3, preview_every=3)
    resumed = train_autoencoder(data, resumed_run, preset="tiny")
    assert resumed_run.log["resumed_from"] == 3
    # The record covers the whole part: the first call's seconds count, and the final loss includes its steps.
    assert resumed_run.log["seconds"] >= first.log["seconds"] > 0
    finished = TrainingRun(tmp_path / "b", steps=6, batch_size=4, checkpoint_every=3, preview_every=3)
    train_autoencoder(data, finished, preset="tiny")  # nothing left to train: all from the last checkpoint
    recorded = json.loads((tmp_path / "b" / "checkpoints" / "step-6" / "state.json").read_text())["seconds"]
    assert finished.log["resumed_from"] == 6 and finished.log["seconds"] == round(recorded, 1)
    assert finished.log["final_loss"] == pytest.approx(resumed_run.log["final_loss"])
    assert sorted(p.name for p in (tmp_path / "b" / "previews").iterdir()) == ["step-3.png", "step-6.png"]
    assert states_equal(straight, resumed)
    untrained = build_autoencoder(get_preset("tiny"))
    assert not states_equal(straight, untrained)
    assert straight.config.scaling_factor != pytest.approx(0.18215)  # fitted to the latents' spread


def test_a_checkpoint_resumes_only_on_the_data_it_was_trained_on(data, tmp_path):
    """A part's checkpoints carry the digest of the data they saw; a work folder resumed on other data (another
    index, or phantoms a changed renderer drew) is refused, never silently mixed into the record."""
    from xreal.core.errors import XRealError

    first = TrainingRun(tmp_path / "a", steps=2, batch_size=4, checkpoint_every=2)
    train_autoencoder(data, first, preset="tiny")
    assert first.log["data_sha256"] == data.sha256 and len(data.sha256) == 64
    state = json.loads((tmp_path / "a" / "checkpoints" / "step-2" / "state.json").read_text())
    assert state["data_sha256"] == data.sha256
    other = copy.copy(data)
    other.__dict__.pop("sha256", None)  # the copy digests its own pixels
    other.images = data.images.clone()
    other.images[0, :, 0, 0] += 0.01  # one pixel of one image
    assert other.sha256 != data.sha256
    with pytest.raises(XRealError, match=r"step-2: trained on other data .* Train into a new work folder"):
        train_autoencoder(other, TrainingRun(tmp_path / "a", steps=4, batch_size=4, checkpoint_every=2), preset="tiny")
    resumed = TrainingRun(tmp_path / "a", steps=4, batch_size=4, checkpoint_every=2)
    train_autoencoder(data, resumed, preset="tiny")
    assert resumed.log["resumed_from"] == 2 and resumed.log["data_sha256"] == data.sha256
    # A checkpoint from before digests were kept resumes, and its record says the data is unknown.
    state_file = tmp_path / "a" / "checkpoints" / "step-4" / "state.json"
    state = json.loads(state_file.read_text())
    del state["data_sha256"]
    state_file.write_text(json.dumps(state))
    older = TrainingRun(tmp_path / "a", steps=6, batch_size=4, checkpoint_every=2)
    train_autoencoder(other, older, preset="tiny")
    assert older.log["resumed_from"] == 4 and older.log["data_sha256"] is None


def test_anatomy_controller_and_backbone_resume_exactly(data, tmp_path):
    ac = train_autoencoder(
        data, TrainingRun(tmp_path / "ac", steps=2, batch_size=4), preset="tiny", anatomy_controller=True
    )
    straight = train_backbone(
        data, TrainingRun(tmp_path / "x", steps=4, batch_size=4, checkpoint_every=2), ac, ac, preset="tiny"
    )
    train_backbone(data, TrainingRun(tmp_path / "y", steps=2, batch_size=4, checkpoint_every=2), ac, ac, preset="tiny")
    resumed = train_backbone(
        data, TrainingRun(tmp_path / "y", steps=4, batch_size=4, checkpoint_every=2), ac, ac, preset="tiny"
    )
    assert states_equal(straight.unet, resumed.unet)  # EMA weights, restored from the checkpoint too
    assert states_equal(straight.text_encoder, resumed.text_encoder)
    checkpoints = list((tmp_path / "y" / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-4"]
    assert {p.name for p in checkpoints[0].iterdir()} == {
        "unet.safetensors",
        "text_encoder.safetensors",
        "optimizer.pt",
        "ema.pt",
        "state.json",
    }


def test_the_training_set_marks_the_pixels_of_every_finding(tmp_path):
    write_phantom_training_set(tmp_path, count=12, size=64, seed=4)
    data = load_training_set(tmp_path, size=32, split=None)
    frame = read_training_index(tmp_path)
    assert data.finding_masks.shape == (12, 32, 32) and data.finding_masks.dtype == torch.bool
    with_findings = 0
    for i, masks in enumerate(frame["pathology_masks"]):
        expected = np.zeros((32, 32), bool)
        for mask in masks if masks is not None else []:
            expected |= resize_mask(read_binary_mask(tmp_path / mask["path"]), 32)
        assert np.array_equal(data.finding_masks[i].numpy(), expected), i
        with_findings += bool(expected.any())
    assert 0 < with_findings < 12  # healthy rows have an empty mask


def test_finding_weights_mark_every_latent_cell_a_finding_touches():
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 13, 21] = True  # one pixel: cell (3, 5) of a 16x16 latent
    masks[1, 8:16, 0:4] = True  # two cells tall, one wide
    weights = finding_weights(masks, (16, 16), 5.0)
    assert weights.shape == (2, 1, 16, 16)
    assert weights[0, 0, 3, 5] == 6.0 and (weights[0] == 6.0).sum() == 1 and (weights[0] == 1.0).sum() == 255
    assert weights[1, 0, 2:4, 0].tolist() == [6.0, 6.0] and (weights[1] == 6.0).sum() == 2
    assert torch.equal(finding_weights(masks, (16, 16), 0.0), torch.ones(2, 1, 16, 16))


def test_small_findings_are_weighed_up_to_min_cells_and_large_ones_stay():
    masks = torch.zeros(3, 64, 64, dtype=torch.bool)
    masks[0, 13, 21] = True  # one cell
    masks[1, 8:16, 0:4] = True  # two cells
    masks[2, 0:32, 0:32] = True  # 64 cells, above min_cells
    weights = finding_weights(masks, (16, 16), 5.0, min_cells=8)
    assert weights[0, 0, 3, 5] == 1 + 5.0 * 8 and (weights[0] > 1).sum() == 1
    assert weights[1, 0, 2:4, 0].tolist() == [1 + 5.0 * 4] * 2  # the two cells share the weight of eight
    assert torch.equal(weights[2], finding_weights(masks, (16, 16), 5.0)[2])
    assert torch.equal(
        finding_weights(torch.zeros(1, 64, 64, dtype=torch.bool), (16, 16), 5.0, 8), torch.ones(1, 1, 16, 16)
    )
    # every image's extra weight adds up to at least min_cells cells' worth
    extra = (weights - 1).sum(dim=(1, 2, 3)) / 5.0
    assert extra[:2].tolist() == [8.0, 8.0] and extra[2] == 64.0


def test_the_findings_part_continues_the_backbone_and_its_weight_changes_what_it_learns(data, tmp_path):
    ac = train_autoencoder(
        data, TrainingRun(tmp_path / "ac", steps=2, batch_size=4), preset="tiny", anatomy_controller=True
    )
    base = train_backbone(data, TrainingRun(tmp_path / "b", steps=2, batch_size=4), ac, ac, preset="tiny")
    frozen = TrainingRun(tmp_path / "frozen", steps=2, batch_size=4, learning_rate=0.0)
    assert states_equal(continue_with_findings(data, frozen, copy.deepcopy(base)).unet, base.unet)  # base's weights
    plain, weighted = (
        continue_with_findings(data, TrainingRun(tmp_path / f"w{w}", steps=2, batch_size=4), copy.deepcopy(base), w)
        for w in (0.0, 20.0)
    )
    assert not states_equal(plain.unet, base.unet)
    assert not states_equal(weighted.unet, plain.unet)  # the same batches and noise: only the weights differ
    assert (tmp_path / "w20.0" / "checkpoints" / "step-2").is_dir()


def test_draw_chances_weigh_up_the_oversampled_labels_only():
    from xreal.core.errors import XRealError
    from xreal.core.labels import CHEXPERT_LABELS

    labels = torch.zeros(4, len(CHEXPERT_LABELS), dtype=torch.bool)
    labels[1, CHEXPERT_LABELS.index("Lung Lesion")] = True
    labels[2, CHEXPERT_LABELS.index("Atelectasis")] = True
    labels[2, CHEXPERT_LABELS.index("Lung Lesion")] = True  # two oversampled labels: the larger factor, not both
    labels[3, CHEXPERT_LABELS.index("Edema")] = True
    chances = draw_chances(labels, {"Lung Lesion": 4.0, "Atelectasis": 2.0})
    assert chances == pytest.approx(np.array([1.0, 4.0, 4.0, 1.0]) / 10.0)
    with pytest.raises(XRealError, match="unknown label 'Nodule'"):
        draw_chances(labels, {"Nodule": 4.0})
    with pytest.raises(XRealError, match="Atelectasis's factor must be positive"):
        draw_chances(labels, {"Atelectasis": 0.0})


def test_oversampling_draws_the_named_findings_more_often(data, tmp_path):
    from xreal.core.labels import CHEXPERT_LABELS

    ac = train_autoencoder(
        data, TrainingRun(tmp_path / "ac", steps=1, batch_size=4), preset="tiny", anatomy_controller=True
    )
    base = train_backbone(data, TrainingRun(tmp_path / "b", steps=1, batch_size=4), ac, ac, preset="tiny")
    label = max(CHEXPERT_LABELS[1:], key=lambda name: int(data.labels[:, CHEXPERT_LABELS.index(name)].sum()))
    has = data.labels[:, CHEXPERT_LABELS.index(label)]
    assert 0 < int(has.sum()) <= len(data) // 3
    tokens = base.tokenizer(
        data.prompts, padding="max_length", truncation=True, max_length=base.text_encoder.config.max_positions,
        return_tensors="pt",
    ).input_ids  # fmt: skip
    with_label = tokens[has]

    def share_drawn(name, oversample):
        """The share of the text encoder's inputs (the drawn images' prompts) that are a prompt with ``label``."""
        seen = []
        hook = base.text_encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
        run = TrainingRun(tmp_path / name, steps=6, batch_size=16, learning_rate=0.0)
        try:
            train_backbone(data, run, ac, ac, preset="tiny", start_from=base, oversample=oversample)
        finally:
            hook.remove()
        drawn = torch.cat(seen)
        return run, float((drawn[:, None] == with_label[None]).all(dim=-1).any(dim=1).float().mean())

    plain_run, plain = share_drawn("plain", None)
    over_run, over = share_drawn("over", {label: 50.0})
    assert "oversample" not in plain_run.log and over_run.log["oversample"] == {label: 50.0}
    assert plain < 0.5 < 0.7 < over  # 1/3 at most of the images; about 0.9 of the draws at 50 times as often


def test_max_timestep_trains_at_the_low_noise_levels_only(data, tmp_path):
    from xreal.core.errors import XRealError

    ac = train_autoencoder(
        data, TrainingRun(tmp_path / "ac", steps=1, batch_size=4), preset="tiny", anatomy_controller=True
    )
    base = train_backbone(data, TrainingRun(tmp_path / "b", steps=1, batch_size=4), ac, ac, preset="tiny")

    def drawn(max_timestep, name, share=0.0):
        seen = []

        def keep(module, args):  # a training step's timesteps, one per item (the preview samples with one)
            if args[1].ndim == 1:
                seen.append(args[1].clone())

        hook = base.unet.register_forward_pre_hook(keep)
        run = TrainingRun(tmp_path / name, steps=3, batch_size=4)
        try:
            train_backbone(data, run, ac, ac, preset="tiny", start_from=base, max_timestep=max_timestep,
                           all_levels_share=share)  # fmt: skip
        finally:
            hook.remove()
        return torch.cat(seen), run.log

    low, log = drawn(5, "low")
    assert len(low) == 12 and int(low.max()) < 5 and log["max_timestep"] == 5
    everywhere, log = drawn(None, "all")
    assert int(everywhere.max()) >= 5 and "max_timestep" not in log
    mixed, log = drawn(5, "mixed", share=0.5)  # per step: two of the four at all levels, two below 5
    mixed = mixed.view(3, 4)
    assert int(mixed[:, 2:].max()) < 5 and int(mixed[:, :2].max()) >= 5 and log["all_levels_share"] == 0.5
    with pytest.raises(XRealError, match="max_timestep must lie in"):
        train_backbone(data, TrainingRun(tmp_path / "bad", steps=1, batch_size=4), ac, ac, preset="tiny",
                       max_timestep=1001)  # fmt: skip
    with pytest.raises(XRealError, match="all_levels_share must lie in"):
        train_backbone(data, TrainingRun(tmp_path / "bad", steps=1, batch_size=4), ac, ac, preset="tiny",
                       max_timestep=5, all_levels_share=1.5)  # fmt: skip
    with pytest.raises(XRealError, match="all_levels_share needs max_timestep"):
        train_backbone(data, TrainingRun(tmp_path / "bad", steps=1, batch_size=4), ac, ac, preset="tiny",
                       all_levels_share=0.5)  # fmt: skip


def test_train_commands_chain_into_a_loadable_bundle(tmp_path):
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from xreal.cli import cli
    from xreal.model.bundle import load_pipeline

    write_phantom_training_set(tmp_path / "set", count=12, size=64, seed=3)
    common = ["--index", tmp_path / "set", "--preset", "tiny", "--steps", "2", "--batch-size", "2"]
    for part in ("autoencoder", "anatomy-controller"):
        result = CliRunner().invoke(cli, ["train", part, *map(str, common), "--out", str(tmp_path / part)])
        assert result.exit_code == 0, result.output
    decoder = ["train", "decoder", *map(str, common), "--out", str(tmp_path / "decoder"), "--perceptual-weight", "0"]
    result = CliRunner().invoke(cli, [*decoder, "--autoencoder", str(tmp_path / "autoencoder")])
    assert result.exit_code == 0, result.output
    trained, tuned = (load_file(tmp_path / part / "model" / "diffusion_pytorch_model.safetensors")
                      for part in ("autoencoder", "decoder"))  # fmt: skip
    assert all(torch.equal(trained[k], tuned[k]) for k in trained if k.startswith("encoder."))
    assert not all(torch.equal(trained[k], tuned[k]) for k in trained if k.startswith("decoder."))
    missing = CliRunner().invoke(cli, [*decoder, "--autoencoder", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "--autoencoder" in missing.output and "nowhere" in missing.output
    weighed = [*decoder[:-3], str(tmp_path / "decoder-structure"), *decoder[-2:], "--structure-weight", "50"]
    result = CliRunner().invoke(cli, [*weighed, "--autoencoder", str(tmp_path / "autoencoder")])
    assert result.exit_code == 0, result.output
    structured = load_file(tmp_path / "decoder-structure" / "model" / "diffusion_pytorch_model.safetensors")
    assert not all(torch.equal(tuned[k], structured[k]) for k in tuned if k.startswith("decoder."))
    negative = CliRunner().invoke(
        cli, [*weighed, "--autoencoder", str(tmp_path / "autoencoder"), "--structure-weight", "-1"]
    )
    assert negative.exit_code == 2 and "--structure-weight" in negative.output
    other_sizes = [a if a != "tiny" else "demo" for a in decoder]  # the tiny autoencoder, at the demo preset
    refused = CliRunner().invoke(cli, [*other_sizes, "--autoencoder", str(tmp_path / "autoencoder")])
    assert refused.exit_code == 2 and "--preset demo needs 64 px" in refused.output, refused.output
    backbone = ["train", "backbone", *map(str, common), "--out", str(tmp_path / "b"), "--autoencoder"]
    missing = CliRunner().invoke(
        cli, [*backbone, str(tmp_path / "decoder"), "--anatomy-controller", str(tmp_path / "nowhere")]
    )
    assert missing.exit_code == 2 and "--anatomy-controller" in missing.output and "nowhere" in missing.output
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "backbone",
            *map(str, common),
            "--out",
            str(tmp_path / "backbone"),
            "--autoencoder",
            str(tmp_path / "decoder"),  # the fine-tuned decoder with the autoencoder's encoder
            "--anatomy-controller",
            str(tmp_path / "anatomy-controller"),
        ],
    )
    assert result.exit_code == 0, result.output
    pipeline = load_pipeline(tmp_path / "backbone" / "bundle")
    assert pipeline.config.preset == "tiny"
    assert "| backbone | 2 | 2 |" in (tmp_path / "backbone" / "bundle" / "MODEL_CARD.md").read_text()
    parts = ["--autoencoder", str(tmp_path / "decoder"), "--anatomy-controller", str(tmp_path / "anatomy-controller")]
    go_on = ["train", "backbone", *map(str, common), *parts, "--out", str(tmp_path / "more"), "--finding-weight", "5"]
    started = ["--start-from", str(tmp_path / "backbone" / "bundle"), "--finding-min-cells", "8"]
    started += ["--max-timestep", "300", "--all-levels-share", "0.25"]
    result = CliRunner().invoke(cli, [*go_on, *started])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "more" / "bundle" / "xreal_bundle.json").read_text())["training"]
    assert record["runs"]["backbone"]["finding_weight"] == 5.0 and record["start_from"].endswith("backbone/bundle")
    assert record["runs"]["backbone"]["finding_min_cells"] == 8 and record["runs"]["backbone"]["max_timestep"] == 300
    assert record["runs"]["backbone"]["all_levels_share"] == 0.25
    too_late = CliRunner().invoke(cli, [*go_on, *started[:2], "--max-timestep", "1001"])
    assert too_late.exit_code == 2 and "--max-timestep" in too_late.output and "1000 timesteps" in too_late.output
    alone = CliRunner().invoke(cli, [*go_on, *started[:2], "--all-levels-share", "0.5"])
    assert alone.exit_code == 2 and "--all-levels-share" in alone.output and "needs --max-timestep" in alone.output
    missing = CliRunner().invoke(cli, [*go_on, "--start-from", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "--start-from" in missing.output and "nowhere" in missing.output
    empty = CliRunner().invoke(
        cli, ["train", "autoencoder", "--index", str(tmp_path), "--out", str(tmp_path / "x"), "--steps", "1"]
    )
    assert empty.exit_code == 2 and "cannot read training index" in empty.output


def test_detail_loss_training_resumes_exactly_across_the_discriminator_start(data, tmp_path):
    """Perceptual network, discriminator and its optimizer state all come back on a resume: a run stopped after
    step 3 (the discriminator joins at step 2) ends where an uninterrupted run does."""
    from xreal.model.autoencoder_loss import PERCEPTUAL_FILE, DetailLoss

    detail = DetailLoss(discriminator_start=2, perceptual_steps=4, discriminator_width=8)
    straight_run = TrainingRun(tmp_path / "a", steps=5, batch_size=4, checkpoint_every=3)
    straight = train_autoencoder(data, straight_run, preset="tiny", detail=detail)
    train_autoencoder(data, TrainingRun(tmp_path / "b", steps=3, batch_size=4), preset="tiny", detail=detail)
    assert (tmp_path / "b" / PERCEPTUAL_FILE).is_file()
    checkpoint = tmp_path / "b" / "checkpoints" / "step-3"
    assert {"model.safetensors", "discriminator.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    resumed_run = TrainingRun(tmp_path / "b", steps=5, batch_size=4, checkpoint_every=3)
    resumed = train_autoencoder(data, resumed_run, preset="tiny", detail=detail)
    assert resumed_run.log["resumed_from"] == 3 and resumed_run.log["detail_loss"] == detail.to_dict()
    assert states_equal(straight, resumed)
    plain = train_autoencoder(data, TrainingRun(tmp_path / "c", steps=5, batch_size=4), preset="tiny")
    assert not states_equal(straight, plain)


def test_adversarial_term_trains_the_decoder_and_the_hinge_trains_the_discriminator(data):
    """One optimizer steps both networks, so the generator's term must not reach the discriminator's weights
    and the discriminator's hinge must not reach the autoencoder."""
    import torch.nn.functional as F

    from xreal.model.autoencoder_loss import DetailLoss, PatchDiscriminator, autoencoder_loss

    torch.manual_seed(0)
    model, disc = build_autoencoder(get_preset("tiny")), PatchDiscriminator(width=8)
    images = data.images[:4]
    detail = DetailLoss(discriminator_start=0, perceptual_weight=0.0)
    loss = autoencoder_loss(model, images, images, torch.Generator().manual_seed(1), 1e-6, 5, detail, None, disc)
    loss.backward()
    with_adversarial = [p.grad.clone() for p in disc.parameters()]
    decoder_grad = model.decoder.conv_out.weight.grad.clone()

    for p in (*disc.parameters(), *model.parameters()):
        p.grad = None
    posterior = model.encode(images).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(1))
    reconstruction = model.decode(posterior.mean + posterior.std * noise).sample
    hinge = 0.5 * (F.relu(1.0 - disc(images)).mean() + F.relu(1.0 + disc(reconstruction.detach())).mean())
    hinge.backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(with_adversarial, disc.parameters(), strict=True))
    assert model.decoder.conv_out.weight.grad is None  # the hinge saw detached reconstructions

    for p in model.parameters():
        p.grad = None
    plain = autoencoder_loss(model, images, images, torch.Generator().manual_seed(1), 1e-6)
    plain.backward()
    assert not torch.allclose(decoder_grad, model.decoder.conv_out.weight.grad)  # the adversarial term counted


def test_perceptual_distance_is_zero_for_the_same_image_and_grows_with_blur(data):
    from scipy import ndimage

    from xreal.model.autoencoder_loss import PerceptualDistance, train_perceptual_network

    network = train_perceptual_network(data.images, data.labels, steps=3)
    distance = PerceptualDistance(network)
    images = data.images[:6]
    assert torch.allclose(distance(images, images), torch.zeros(6), atol=1e-6)
    slight = torch.from_numpy(ndimage.gaussian_filter(images.numpy(), (0, 0, 0.5, 0.5))).float()
    strong = torch.from_numpy(ndimage.gaussian_filter(images.numpy(), (0, 0, 2.0, 2.0))).float()
    assert torch.all(distance(images, strong) > distance(images, slight))
    assert not any(p.requires_grad for p in distance.parameters())


def test_texture_gap_is_zero_for_the_same_image_and_grows_as_the_detail_is_blurred_away(data):
    from scipy import ndimage

    from xreal.model.autoencoder_loss import texture_gap

    images = data.images[:6]
    assert torch.allclose(texture_gap(images, images), torch.zeros(6))
    slight, strong = (
        torch.from_numpy(ndimage.gaussian_filter(images.numpy(), (0, 0, s, s))).float() for s in (0.5, 2.0)
    )
    assert torch.all(texture_gap(images, strong) > texture_gap(images, slight))
    # It weighs how much detail a patch holds, not where: the same detail moved by a pixel costs less than losing it.
    moved = torch.roll(images, 1, dims=3)
    assert torch.all(texture_gap(images, moved) < texture_gap(images, strong))


def test_structure_gap_tells_which_way_the_detail_runs_where_the_texture_gap_cannot(data):
    """Ribs across a lung and a grid of lines hold the same fine-detail power; only their direction differs."""
    from scipy import ndimage

    from xreal.model.autoencoder_loss import structure_gap, texture_gap

    y, x = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    across, down = (0.2 * torch.sin(2 * torch.pi * t / 4)[None, None].expand(1, 3, 64, 64) for t in (x, y))
    assert texture_gap(across, down) < 0.001
    assert structure_gap(across, down) > 50 * texture_gap(across, down)
    images = data.images[:6]
    assert torch.allclose(structure_gap(images, images), torch.zeros(6))
    blurred = torch.from_numpy(ndimage.gaussian_filter(images.numpy(), (0, 0, 2.0, 2.0))).float()
    assert torch.all(structure_gap(images, blurred) > 0.01)


@pytest.mark.parametrize("term", ["texture", "structure"])
def test_the_texture_and_structure_terms_add_their_weighted_gap_to_the_loss(data, term):
    from xreal.model import autoencoder_loss as losses_module
    from xreal.model.autoencoder_loss import DetailLoss, autoencoder_loss

    torch.manual_seed(0)
    model = build_autoencoder(get_preset("tiny"))
    images = data.images[:4]
    losses = {
        weight: autoencoder_loss(
            model, images, images, torch.Generator().manual_seed(1), 1e-6, 0,
            DetailLoss(perceptual_weight=0.0, **{f"{term}_weight": weight}),
        )
        for weight in (0.0, 10.0)
    }  # fmt: skip
    posterior = model.encode(images).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(1))
    reconstruction = model.decode(posterior.mean + posterior.std * noise).sample
    gap = getattr(losses_module, f"{term}_gap")(reconstruction, images).mean()
    assert gap > 0 and torch.isclose(losses[10.0] - losses[0.0], 10.0 * gap, rtol=1e-4)


def test_fine_tuning_the_decoder_leaves_the_encoder_and_its_latents_as_they_were(data, tmp_path):
    """A backbone trained on the autoencoder's latents stays valid after the decoder is fine-tuned."""
    from xreal.model.autoencoder_loss import DetailLoss
    from xreal.model.training import _latents

    autoencoder = train_autoencoder(data, TrainingRun(tmp_path / "ae", steps=2, batch_size=4), preset="tiny")
    before = {k: v.clone() for k, v in autoencoder.state_dict().items()}
    detail = DetailLoss(perceptual_weight=0.0, discriminator_start=0, discriminator_width=8, texture_weight=10.0)
    run = TrainingRun(tmp_path / "decoder", steps=3, batch_size=4)
    tuned = train_autoencoder(data, run, preset="tiny", detail=detail, fine_tune=autoencoder)
    after = tuned.state_dict()
    assert all(torch.equal(autoencoder.state_dict()[k], v) for k, v in before.items())  # the one given is untouched
    encoder = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    decoder = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    assert not all(torch.equal(before[k], after[k]) for k in decoder)
    assert torch.equal(_latents(autoencoder, data.images), _latents(tuned, data.images))
    assert tuned.config.scaling_factor == autoencoder.config.scaling_factor
    assert run.log["detail_loss"]["texture_weight"] == 10.0


def test_a_checkpoint_of_other_sizes_is_refused_naming_the_folder(data, tmp_path, monkeypatch):
    """A work folder left by another preset (the demo preset went from 16x16 to 32x32 latents) is not resumed."""
    from dataclasses import replace

    from xreal.core.errors import XRealError
    from xreal.model.bundle import PRESETS

    train_autoencoder(data, TrainingRun(tmp_path / "w", steps=1, batch_size=2, checkpoint_every=1), preset="tiny")
    monkeypatch.setitem(PRESETS, "wider", replace(PRESETS["tiny"], name="wider", autoencoder_channels=(8, 16)))
    with pytest.raises(XRealError, match=r"checkpoints/step-1: its model does not fit .* new work folder"):
        train_autoencoder(data, TrainingRun(tmp_path / "w", steps=2, batch_size=2), preset="wider")
