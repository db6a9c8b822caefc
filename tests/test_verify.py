"""`xreal verify`: mounted bundles, judge sets and weight files checked against what was recorded."""

import shutil

import pytest

from xreal.core.errors import XRealError
from xreal.core.weights import record_weights, weights_info
from xreal.model.bundle import DEMO_BUNDLE
from xreal.run.verify import bundles_in, verify_files


def test_a_good_bundle_and_recorded_weights_pass_and_each_problem_is_named(tmp_path):
    models, cache = tmp_path / "models", tmp_path / "weights"
    shutil.copytree(DEMO_BUNDLE, models / "demo")
    cache.mkdir()
    assert bundles_in(models) == [models / "demo"]
    lines = verify_files(bundles_in(models), cache)
    assert lines[0].startswith(f"{models / 'demo'}: model bundle ok") and "judge set ok" in lines[1]

    name = "densenet121-res224-all"
    weights = cache / weights_info(name).file
    weights.write_bytes(b"weights copied by hand")
    with pytest.raises(XRealError, match=f"not in the weight lock; record it with `xreal weights record {name}`"):
        verify_files(bundles_in(models), cache)
    record_weights([name], cache)
    assert f"{weights.name}: weights ok" in verify_files(bundles_in(models), cache)

    weights.write_bytes(b"something else")
    (models / "demo" / "judges" / "judges.json").unlink()
    with pytest.raises(XRealError) as failure:
        verify_files(bundles_in(models), cache, require_weights=["101-elastic"])
    message = str(failure.value)
    assert f"{weights.name}: sha256 differs" in message  # every problem at once, each named
    assert "not a judge set" in message
    assert f"{weights_info('101-elastic').file}: required weights are missing" in message


def test_judges_trained_through_another_autoencoder_are_named_by_verify_and_before_a_run(tmp_path, monkeypatch):
    """`make demo-model` keeps the bundle's judges; when it changes the autoencoder they were trained through,
    `xreal verify` and `xreal generate` say so (the judges may read the new decoder's texture as findings)."""
    from click.testing import CliRunner
    from safetensors.torch import load_file, save_file

    from xreal.cli import cli
    from xreal.cli import run as run_commands
    from xreal.core.records import record_bundle_files

    bundle = tmp_path / "demo"
    shutil.copytree(DEMO_BUNDLE, bundle)
    assert not [line for line in verify_files([bundle]) if line.startswith("warning")]

    vae = next((bundle / "vae").glob("*.safetensors"))
    weights = load_file(vae)
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1  # a retrained autoencoder, as far as its checksum goes
    save_file(weights, vae)
    record_bundle_files(bundle)
    (warning,) = [line for line in verify_files([bundle]) if line.startswith("warning")]
    assert "trained through another autoencoder" in warning and f"xreal train judges --autoencoder {bundle}" in warning

    monkeypatch.setattr(run_commands, "_run_parameters", lambda **kwargs: (_ for _ in ()).throw(SystemExit(0)))
    manifest = DEMO_BUNDLE.parents[2] / "manifests" / "demo.parquet"
    result = CliRunner().invoke(
        cli, ["generate", str(manifest), "--out", str(tmp_path / "run"), "--model", str(bundle)]
    )
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stderr and "trained through another autoencoder" in result.stderr
