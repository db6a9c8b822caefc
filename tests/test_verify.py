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
