import hashlib
import inspect
import json
import os
import re
import warnings

import pytest
import torch
from click.testing import CliRunner

from xreal.cli import cli
from xreal.core.weights import (
    LOCK_NAME,
    PROJECT_WEIGHTS,
    PSPNET_URL,
    WeightsError,
    default_cache_dir,
    fetch_weights,
    known_weights,
    load_autoencoder,
    load_classifier,
    load_segmenter,
    read_lock,
    record_weights,
    verify_weights,
    weights_info,
    weights_status,
)

with warnings.catch_warnings():
    import torchxrayvision as xrv

DENSENET = "densenet121-res224-all"


@pytest.fixture(autouse=True)
def no_weights_env(monkeypatch):
    monkeypatch.delenv("XREAL_WEIGHTS_DIR", raising=False)


@pytest.fixture(scope="module")
def densenet_file(tmp_path_factory):
    """A DenseNet weight file in torchxrayvision's format (a whole pickled module), random weights."""
    torch.manual_seed(0)
    model = xrv.models.DenseNet(weights=None)
    path = tmp_path_factory.mktemp("saved") / "densenet.pt"
    torch.save(model, path)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def cache(tmp_path, densenet_file):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / weights_info(DENSENET).file).write_bytes(densenet_file[0].read_bytes())
    return folder


@pytest.fixture
def no_torch_load(monkeypatch):
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("torch.load called on an unverified file")

    monkeypatch.setattr(torch, "load", refuse)
    return calls


def flip_byte(path, offset=1000):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_table_matches_torchxrayvision_file_names(cache):
    table = known_weights()
    assert set(PROJECT_WEIGHTS) <= set(table)
    assert table[DENSENET].kind == "classifier" and table["101-elastic"].kind == "autoencoder"
    # torchxrayvision's own path logic finds the file under our name (and so does not download)
    assert xrv.models.get_weights(DENSENET, cache_dir=str(cache)) == str(cache / table[DENSENET].file)
    assert table["101-elastic"].url == xrv.autoencoders.model_urls["101-elastic"]["weights_url"]
    assert PSPNET_URL in inspect.getsource(xrv.baseline_models.chestx_det.PSPNet.__init__)
    assert table["chestx_det"].file == "pspnet_chestxray_best_model_4.pth"


def test_default_cache_dir(monkeypatch, tmp_path):
    assert default_cache_dir() == default_cache_dir().expanduser()
    assert default_cache_dir().parts[-2:] == (".torchxrayvision", "models_data")
    monkeypatch.setenv("XREAL_WEIGHTS_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    with pytest.raises(WeightsError, match=re.escape(str(tmp_path))):
        verify_weights(DENSENET)


def test_recorded_file_loads_through_torchxrayvision(cache, densenet_file):
    hashes = record_weights([DENSENET], cache)
    path = cache / weights_info(DENSENET).file
    assert hashes == {DENSENET: hashlib.sha256(path.read_bytes()).hexdigest()}
    entry = json.loads((cache / LOCK_NAME).read_text())["files"][path.name]
    assert entry["sha256"] == hashes[DENSENET] and entry["source"] == "recorded by hand"
    assert verify_weights(DENSENET, cache) == path

    model = load_classifier(cache_dir=cache)
    assert not model.training
    assert model.weights_filename_local == str(path)
    assert model.pathologies == xrv.models.model_urls[DENSENET]["labels"]
    saved = densenet_file[1]
    loaded = model.state_dict()
    assert set(saved) <= set(loaded)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_autoencoder_state_dict_loads(tmp_path):
    torch.manual_seed(1)
    ae = xrv.autoencoders.ResNetAE101()
    torch.save(ae.state_dict(), tmp_path / weights_info("101-elastic").file)
    lock = tmp_path / "elsewhere" / "lock.json"
    record_weights(["101-elastic"], tmp_path, lock=lock)
    assert not (tmp_path / LOCK_NAME).exists() and lock.is_file()
    loaded = load_autoencoder(cache_dir=tmp_path, lock=lock)
    assert not loaded.training and loaded.weights == "101-elastic"
    assert torch.equal(loaded.state_dict()["conv1.weight"], ae.state_dict()["conv1.weight"])


def test_changed_file_is_refused_before_torch_load(cache, no_torch_load):
    record_weights([DENSENET], cache)
    path = cache / weights_info(DENSENET).file
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    flip_byte(path)
    bad = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(WeightsError) as info:
        load_classifier(cache_dir=cache)
    message = str(info.value)
    assert "refusing to load" in message and path.name in message and good in message and bad in message
    assert no_torch_load == []


def test_lock_with_other_hash_is_refused(cache, no_torch_load, tmp_path):
    lock = tmp_path / "lock.json"
    name = weights_info(DENSENET).file
    lock.write_text(json.dumps({"version": 1, "files": {name: {"sha256": "0" * 64, "source": "x", "recorded": "y"}}}))
    with pytest.raises(WeightsError, match=r"0{64}"):
        load_classifier(cache_dir=cache, lock=lock)
    with pytest.raises(WeightsError, match="already records"):
        record_weights([DENSENET], cache, lock=lock)
    (chestx := cache / weights_info("chestx_det").file).write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not recorded"):
        load_segmenter(cache_dir=cache, lock=lock)
    assert no_torch_load == []
    record_weights([DENSENET], cache, lock=lock, replace=True)
    assert verify_weights(DENSENET, cache, lock) == cache / name
    assert chestx.read_bytes() == b"not a checkpoint"


def test_unrecorded_missing_and_unknown(cache, tmp_path, no_torch_load):
    with pytest.raises(WeightsError) as info:
        load_classifier(cache_dir=cache)
    assert f"xreal weights record {DENSENET} --cache-dir {cache}" in str(info.value)
    assert "xreal weights fetch" in str(info.value)

    empty = tmp_path / "empty"
    for call in (lambda: verify_weights(DENSENET, empty), lambda: record_weights([DENSENET], empty)):
        with pytest.raises(WeightsError) as info:
            call()
        message = str(info.value)
        assert weights_info(DENSENET).file in message and str(empty) in message
        assert f"xreal weights fetch {DENSENET} --cache-dir {empty}" in message

    with pytest.raises(WeightsError, match=r"known weights: .*101-elastic"):
        verify_weights("densenet121-res224-everything", cache)
    with pytest.raises(WeightsError, match="not classifier"):
        load_classifier("101-elastic", cache_dir=cache)
    (tmp_path / "bad.json").write_text('{"version": 7, "files": {}}')
    with pytest.raises(WeightsError, match="version 1"):
        read_lock(tmp_path / "bad.json")
    assert no_torch_load == []


def serving(path, calls):
    def opener(url):
        calls.append(url)
        return open(path, "rb")

    return opener


def test_fetch_records_then_checks_the_lock(tmp_path):
    name = "101-elastic"
    good, evil = tmp_path / "good.bin", tmp_path / "evil.bin"
    good.write_bytes(os.urandom(3 << 20))
    evil.write_bytes(os.urandom(3 << 20))
    cache, lock = tmp_path / "cache", tmp_path / "lock.json"
    calls = []

    [path] = fetch_weights([name], cache, lock, opener=serving(good, calls))
    assert calls == [weights_info(name).url]
    assert path == cache / weights_info(name).file and path.read_bytes() == good.read_bytes()
    entry = read_lock(lock)[path.name]
    assert entry["sha256"] == hashlib.sha256(good.read_bytes()).hexdigest() and entry["source"] == calls[0]
    assert verify_weights(name, cache, lock) == path

    # present and matching: not downloaded again
    assert fetch_weights([name], cache, lock, opener=serving(evil, calls)) == [path]
    assert len(calls) == 1

    # a download that differs from the lock is never installed
    other = tmp_path / "other"
    with pytest.raises(WeightsError, match="not installed"):
        fetch_weights([name], other, lock, opener=serving(evil, calls))
    assert list(other.iterdir()) == []
    flip_byte(path)
    damaged = path.read_bytes()
    with pytest.raises(WeightsError, match=re.escape(entry["sha256"])):
        fetch_weights([name], cache, lock, opener=serving(evil, calls))
    assert path.read_bytes() == damaged and sorted(p.name for p in cache.iterdir()) == [path.name]
    assert read_lock(lock)[path.name] == entry

    # the good download repairs it
    fetch_weights([name], cache, lock, opener=serving(good, calls))
    assert path.read_bytes() == good.read_bytes() and read_lock(lock)[path.name] == entry

    def failing(url):
        raise OSError("network is unreachable")

    with pytest.raises(WeightsError, match="could not download"):
        fetch_weights([DENSENET], other, lock, opener=failing)
    assert list(other.iterdir()) == []


def test_status_rows(cache):
    rows = {row["name"]: row for row in weights_status(cache)}
    assert list(rows)[:3] == list(PROJECT_WEIGHTS)
    assert rows[DENSENET] == {
        "name": DENSENET,
        "file": weights_info(DENSENET).file,
        "present": True,
        "recorded": False,
        "matches": None,
    }
    assert rows["101-elastic"]["present"] is False and rows["101-elastic"]["matches"] is None
    record_weights([DENSENET], cache)
    assert weights_status(cache)[0]["matches"] is True
    flip_byte(cache / weights_info(DENSENET).file)
    assert weights_status(cache)[0]["matches"] is False


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_record_and_status(cache, tmp_path):
    result = run("weights", "status", "--cache-dir", cache)
    assert result.exit_code == 0, result.output
    assert DENSENET in result.output and "101-elastic" in result.output

    result = run("weights", "record", DENSENET, "--cache-dir", cache)
    assert result.exit_code == 0, result.output
    sha = read_lock(cache / LOCK_NAME)[weights_info(DENSENET).file]["sha256"]
    assert sha in result.output

    result = run("weights", "status", "--cache-dir", cache)
    assert result.exit_code == 0
    line = next(line for line in result.output.splitlines() if line.startswith(DENSENET))
    assert line.split()[1:4] == ["yes", "yes", "yes"]

    flip_byte(cache / weights_info(DENSENET).file)
    result = run("weights", "status", "--cache-dir", cache)
    assert result.exit_code == 1 and "NO" in result.output

    result = run("weights", "record", "101-elastic", "--cache-dir", cache, "--lock", tmp_path / "l.json")
    assert result.exit_code == 2 and "xreal weights fetch 101-elastic" in result.output
    assert "Traceback" not in result.output
    result = run("weights", "fetch", "no-such-weights", "--cache-dir", cache)
    assert result.exit_code == 2 and "known weights" in result.output
