import pytest
import torch

from xreal.data.training_index import write_phantom_training_set
from xreal.model.bundle import build_autoencoder, get_preset
from xreal.model.training import TrainingRun, load_training_set, train_autoencoder, train_backbone


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
    assert sorted(p.name for p in (tmp_path / "b" / "previews").iterdir()) == ["step-3.png", "step-6.png"]
    assert states_equal(straight, resumed)
    untrained = build_autoencoder(get_preset("tiny"))
    assert not states_equal(straight, untrained)
    assert straight.config.scaling_factor != pytest.approx(0.18215)  # fitted to the latents' spread


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


def test_train_commands_chain_into_a_loadable_bundle(tmp_path):
    from click.testing import CliRunner

    from xreal.cli import cli
    from xreal.model.bundle import load_pipeline

    write_phantom_training_set(tmp_path / "set", count=12, size=64, seed=3)
    common = ["--index", tmp_path / "set", "--preset", "tiny", "--steps", "2", "--batch-size", "2"]
    for part in ("autoencoder", "anatomy-controller"):
        result = CliRunner().invoke(cli, ["train", part, *map(str, common), "--out", str(tmp_path / part)])
        assert result.exit_code == 0, result.output
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "backbone",
            *map(str, common),
            "--out",
            str(tmp_path / "backbone"),
            "--autoencoder",
            str(tmp_path / "autoencoder"),
            "--anatomy-controller",
            str(tmp_path / "anatomy-controller"),
        ],
    )
    assert result.exit_code == 0, result.output
    pipeline = load_pipeline(tmp_path / "backbone" / "bundle")
    assert pipeline.config.preset == "tiny"
    assert "| backbone | 2 | 2 |" in (tmp_path / "backbone" / "bundle" / "MODEL_CARD.md").read_text()
    empty = CliRunner().invoke(
        cli, ["train", "autoencoder", "--index", str(tmp_path), "--out", str(tmp_path / "x"), "--steps", "1"]
    )
    assert empty.exit_code == 2 and "cannot read training index" in empty.output
