import json

import pytest
import torch

from xreal.core.errors import XRealError
from xreal.model.bundle import (
    BUNDLE_FILE,
    build_pipeline,
    get_preset,
    load_pipeline,
    reference_scheduler,
    save_bundle,
    verify_bundle,
)
from xreal.text import build_tokenizer


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    torch.manual_seed(0)
    pipeline = build_pipeline("tiny", texts=["Small left pleural effusion."])
    folder = save_bundle(pipeline, tmp_path_factory.mktemp("bundle") / "tiny", training={"data": "none"})
    return pipeline, folder


def test_presets():
    paper = get_preset("paper")
    assert (paper.image_size, paper.latent_size, paper.unet_channels, paper.context_width) == (
        256,
        64,
        (224, 448, 896, 896),
        1280,
    )
    assert get_preset("demo").latent_size == 32
    with pytest.raises(XRealError, match="unknown preset 'huge'"):
        get_preset("huge")


def test_scheduler_follows_the_reference_schedule():
    scheduler = reference_scheduler()
    assert scheduler.betas[0].item() == pytest.approx(0.0015)
    assert scheduler.betas[-1].item() == pytest.approx(0.0295)
    assert torch.allclose(scheduler.betas.sqrt(), torch.linspace(0.0015**0.5, 0.0295**0.5, 1000))
    scheduler.set_timesteps(100)
    assert scheduler.timesteps.tolist() == list(range(991, 0, -10))  # uniform DDIM timesteps, offset by one


def test_tokenizer_encodes_prompts_like_bert():
    tokenizer = build_tokenizer([], max_length=8)
    ids = tokenizer(["Cardiomegaly", ""], padding="max_length", max_length=8).input_ids
    cls, sep, pad = (tokenizer.convert_tokens_to_ids(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    assert ids[0][0] == cls and sep in ids[0] and pad == 0
    assert ids[1][:3] == [cls, sep, pad]
    assert tokenizer.unk_token_id not in ids[0]  # every CheXpert label is in the vocabulary


def test_bundle_round_trip_keeps_every_component(tiny_bundle):
    pipeline, folder = tiny_bundle
    loaded = load_pipeline(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["anatomy_controller", "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae", BUNDLE_FILE]
    )
    assert not [p for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    for name in ("vae", "anatomy_controller", "unet", "text_encoder"):
        original, restored = getattr(pipeline, name).state_dict(), getattr(loaded, name).state_dict()
        assert original.keys() == restored.keys()
        assert all(torch.equal(original[k], restored[k]) for k in original), name
    ids = torch.tensor([[2, 5, 3, 0, 0, 0, 0, 0]])
    assert torch.equal(pipeline.text_encoder(ids), loaded.text_encoder(ids))
    assert loaded.tokenizer("Edema").input_ids == pipeline.tokenizer("Edema").input_ids
    assert loaded.scheduler.config.beta_schedule == "scaled_linear"
    assert loaded.config.preset == "tiny" and list(loaded.config.value_range) == [-1.0, 1.0]


def test_bundle_record_and_checksums(tiny_bundle, tmp_path):
    _, folder = tiny_bundle
    record = json.loads((folder / BUNDLE_FILE).read_text())
    assert record["preset"]["name"] == "tiny" and record["image_size"] == 32
    assert "Cardiomegaly" in record["labels"] and record["training"] == {"data": "none"}
    assert "unet/diffusion_pytorch_model.safetensors" in record["files"]
    verify_bundle(folder)
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    weights = damaged / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(XRealError, match=r"unet/diffusion_pytorch_model\.safetensors does not match its checksum"):
        load_pipeline(damaged)
    with pytest.raises(XRealError, match="not an xreal model bundle"):
        load_pipeline(tmp_path)


def test_a_bundle_saved_from_a_loaded_one_records_no_load_path(tiny_bundle, tmp_path):
    _, folder = tiny_bundle
    loaded = load_pipeline(folder)
    loaded.tokenizer(["effusion"], padding="max_length", truncation=True, max_length=4)  # as training calls it
    again = save_bundle(loaded, tmp_path / "again", training={"data": "none"})
    configs = [p.relative_to(folder) for p in folder.rglob("*.json") if p.name != BUNDLE_FILE]
    assert len(configs) >= 8
    for name in configs:
        assert "_name_or_path" not in (again / name).read_text(), name
    for name in configs:  # the tokenizer's too: a call's truncation is not saved with it
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name


def test_tokenizer_is_reproducible_and_falls_back_to_characters():
    texts = ["Small left pleural effusion.", "Moderate perihilar haziness."]
    first, second = build_tokenizer(texts, 16), build_tokenizer(list(reversed(texts)), 16)
    assert first.get_vocab() == second.get_vocab()
    tokens = first.convert_ids_to_tokens(first("Pleural effusion xyz").input_ids)
    assert tokens == ["[CLS]", "pleural", "effusion", "x", "##y", "##z", "[SEP]"]


def test_model_card_is_written_from_the_record(tiny_bundle, tmp_path):
    import shutil

    from xreal.model.bundle import MODEL_CARD, write_model_card

    _, folder = tiny_bundle
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    card = write_model_card(copy, metrics="| metric | value |\n|---|---|\n| Dice | 0.9 |")
    text = card.read_text()
    assert card.name == MODEL_CARD and "preset `tiny`" in text and "| Dice | 0.9 |" in text
    verify_bundle(copy)  # the card is documentation, outside the checksums


def test_half_precision_bundles_load_as_float32(tmp_path):
    pipeline = build_pipeline("tiny")
    folder = save_bundle(pipeline, tmp_path / "half", weights_dtype=torch.float16)
    assert pipeline.unet.dtype == torch.float32  # the caller's pipeline is left as it was
    loaded = load_pipeline(folder)
    assert loaded.unet.dtype == torch.float32
    assert json.loads((folder / BUNDLE_FILE).read_text())["weights_dtype"] == "float16"
    weight = "conv_in.weight"
    assert torch.equal(loaded.unet.state_dict()[weight], pipeline.unet.state_dict()[weight].half().float())


def test_paper_preset_has_the_reference_architecture():
    from xreal.model.bundle import build_autoencoder, build_text_encoder, build_unet

    paper = get_preset("paper")
    with torch.device("meta"):  # shapes only, no memory
        unet = build_unet(paper)
        autoencoder = build_autoencoder(paper)
    assert unet.config.block_out_channels == (224, 448, 896, 896)
    assert unet.config.down_block_types == ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3
    assert unet.config.cross_attention_dim == 1280 and unet.config.sample_size == 64
    assert unet.config.layers_per_block == 2 and unet.config.attention_head_dim == 8
    assert autoencoder.config.latent_channels == 3 and autoencoder.config.block_out_channels == (128, 256, 512)
    assert autoencoder.config.scaling_factor == pytest.approx(0.18215)
    assert autoencoder.config.mid_block_add_attention  # the reference's KL autoencoders keep it
    with torch.device("meta"):
        text = build_text_encoder(paper, 30522)
    assert text.config.max_positions == 150 and text.blocks[0].to_qkv.weight.shape == (3 * 512, 1280)


def test_model_card_names_the_parts_trained_on_other_or_unknown_data(tmp_path):
    from xreal.model.bundle import write_model_card

    digest, old = "ab" * 32, "cd" * 32
    runs = {
        "autoencoder": {"steps": 4, "resumed_from": 4, "seconds": 1.0, "final_loss": 0.5, "data_sha256": old},
        "anatomy_controller": {"steps": 4, "resumed_from": 4, "seconds": 1.0, "final_loss": 0.5, "data_sha256": None},
        "backbone": {"steps": 4, "resumed_from": 0, "seconds": 1.0, "final_loss": 0.1, "data_sha256": digest},
    }
    training = {"data": "24 images", "data_sha256": digest, "runs": runs}
    text = write_model_card(save_bundle(build_pipeline("tiny"), tmp_path / "b", training=training)).read_text()
    assert "- trained on: 24 images (data sha256 `abababababababab`)" in text
    other = "- parts trained on other or unknown data: autoencoder (cdcdcdcdcdcdcdcd), anatomy_controller (unknown)"
    assert other in text
    runs["autoencoder"]["data_sha256"] = runs["anatomy_controller"]["data_sha256"] = digest
    text = write_model_card(save_bundle(build_pipeline("tiny"), tmp_path / "c", training=training)).read_text()
    assert "other or unknown data" not in text


def test_model_card_of_a_run_resumed_from_its_last_checkpoint(tmp_path):
    """`make demo-model` rerun after its last checkpoint trains no step, so a part has no final loss; the card
    must still be written (it crashed the end of a resumed retrain)."""
    from xreal.model.bundle import write_model_card

    runs = {
        "autoencoder": {"steps": 1200, "resumed_from": 1200, "seconds": 0.0, "final_loss": None, "batch_size": 16},
        "backbone": {"steps": 6000, "resumed_from": 2000, "seconds": 12.5, "final_loss": 0.029, "batch_size": 32},
    }
    folder = save_bundle(build_pipeline("tiny"), tmp_path / "b", training={"data": "none", "runs": runs})
    text = write_model_card(folder).read_text()
    assert "| autoencoder | 1200 | 16 | 0.0 | - |" in text and "| backbone | 6000 | 32 | 12.5 | 0.0290 |" in text
