import json
import os
import subprocess
import sys

import click
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import box_label_map

from xreal.cli import cli
from xreal.core.masks import write_mask_file
from xreal.core.settings import SamplerSettings
from xreal.manifest.schema import write_manifest


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def all_commands(group: click.Group, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from all_commands(command, (*prefix, name))


def test_help_lists_commands_and_every_command_has_help():
    result = run("--help")
    assert result.exit_code == 0
    assert "manifest" in result.output and "phantom" in result.output
    commands = list(all_commands(cli))
    assert {("manifest", "validate"), ("manifest", "audit"), ("manifest", "build")} <= set(commands)
    for command in commands:
        result = run(*command, "--help")
        assert result.exit_code == 0, command
        assert "Usage: " in result.output


@pytest.fixture
def manifest(tmp_path):
    write_mask_file(tmp_path / "anatomy.png", box_label_map())
    rows = [
        {
            "request_id": "a",
            "labels": ["Edema"],
            "num_samples": 2,
            "anatomy_path": "anatomy.png",
            "boxes": [{"label": None, "x_min": 0.1, "y_min": 0.2, "x_max": 0.4, "y_max": 0.6}],
        },
        {"request_id": "b", "labels": ["No Finding"], "num_samples": 1, "anatomy_path": "anatomy.png"},
    ]
    write_manifest(rows, tmp_path / "m.parquet")
    return tmp_path / "m.parquet"


def test_validate_exit_codes(manifest, tmp_path):
    ok = run("manifest", "validate", manifest)
    assert ok.exit_code == 0 and "valid manifest, 2 requests, 3 samples" in ok.output
    write_manifest(
        [{"request_id": "x", "labels": ["Edma"], "num_samples": 1, "anatomy_path": "../../etc/passwd"}],
        tmp_path / "bad.parquet",
    )
    bad = run("manifest", "validate", tmp_path / "bad.parquet")
    assert bad.exit_code == 2
    assert "row 0, request 'x', column 'labels': unknown pathology label 'Edma'" in bad.output
    assert (
        "row 0, request 'x', column 'anatomy_path': path '../../etc/passwd' is outside the allowed root" in bad.output
    )
    as_json = json.loads(run("manifest", "validate", tmp_path / "bad.parquet", "--json").output)
    assert as_json["ok"] is False and {i["column"] for i in as_json["issues"]} == {"labels", "anatomy_path"}


def test_user_errors_exit_2_without_traceback(tmp_path):
    (tmp_path / "notes.parquet").write_text("hello")
    for args in (
        ("manifest", "validate", tmp_path / "notes.parquet"),
        ("manifest", "audit", tmp_path / "missing.parquet"),
        ("manifest", "build", tmp_path / "spec.toml", "--out", tmp_path / "m.parquet"),
    ):
        result = run(*args)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and result.output.startswith("Error: ")
    assert run("phantom", "--size", "1000", "--out", tmp_path).exit_code == 2


def test_console_script_prints_one_paragraph_and_exits_2(tmp_path):
    (tmp_path / "empty.parquet").write_bytes(b"")
    xreal = [sys.executable, "-m", "xreal.cli"]
    result = subprocess.run(
        [*xreal, "manifest", "validate", tmp_path / "empty.parquet"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"Error: {tmp_path / 'empty.parquet'}: empty file; expected a Parquet manifest"


def test_audit_text_and_json(manifest):
    text = run("manifest", "audit", manifest)
    assert text.exit_code == 0 and "Requested images per label" in text.output and "Edema" in text.output
    data = json.loads(run("manifest", "audit", manifest, "--json").output)
    assert data["samples"] == 3 and data["per_label"]["Edema"]["samples"] == 2


def test_build_and_expand(tmp_path):
    (tmp_path / "spec.csv").write_text("request_id,anatomy_template,labels,num_samples\nh,phantom-4,No Finding,3\n")
    built = run("manifest", "build", tmp_path / "spec.csv", "--out", tmp_path / "m.parquet")
    assert built.exit_code == 0, built.output
    expanded = run("manifest", "expand", tmp_path / "m.parquet", "--out", tmp_path / "samples.parquet")
    assert expanded.exit_code == 0, expanded.output
    table = pq.read_table(tmp_path / "samples.parquet")
    assert table["sample_id"].to_pylist() == ["h-r0000", "h-r0001", "h-r0002"]


def test_phantom_command_writes_a_training_set_and_keeps_existing_ones(tmp_path):
    out = tmp_path / "set"
    first = run("phantom", "--count", 3, "--size", 64, "--seed", 2, "--out", out)
    assert first.exit_code == 0, first.output
    assert pq.read_table(out / "index.parquet").num_rows == 3
    assert len(list((out / "images").glob("*.png"))) == 3
    again = run("phantom", "--count", 5, "--out", out)
    assert again.exit_code == 2 and "already exists" in again.output
    assert pq.read_table(out / "index.parquet").num_rows == 3
    assert run("phantom", "--count", 5, "--out", out, "--overwrite").exit_code == 0
    assert pq.read_table(out / "index.parquet").num_rows == 5
    assert run("phantom", "--count", 2, "--out", out, "--overwrite").exit_code == 0
    assert len(list((out / "images").glob("*.png"))) == 2  # files of the replaced set are removed


def test_run_options_that_contradict_each_other_or_need_a_server_exit_2_before_anything_starts(manifest, tmp_path):
    out = tmp_path / "out"
    both = run("generate", manifest, "--out", out, "--dask-workers", "2", "--dask-address", "tcp://127.0.0.1:1")
    assert both.exit_code == 2 and "not both" in both.output
    device = run("generate", manifest, "--out", out, "--device", "cpu", "--dask-address", "tcp://127.0.0.1:1")
    assert device.exit_code == 2 and "workers choose their own devices" in device.output
    bad_device = run("generate", manifest, "--out", out, "--device", "gpu7")
    assert bad_device.exit_code == 2 and "gpu7" in bad_device.output
    assert not out.exists()

    from prefect.settings import PREFECT_API_URL, temporary_settings

    # No server configured, even after a test of this session started one (prefect_api), which would have serve
    # run until interrupted.
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        for command in (["serve"], ["submit", manifest, "--out", out]):
            result = run(*command)
            assert result.exit_code == 2, result.output
            assert "needs a Prefect server" in result.output and "PREFECT_API_URL" in result.output
    scheduled = run("serve", "--cron", "0 2 * * *")
    assert scheduled.exit_code == 2 and "a schedule needs --manifest and --out" in scheduled.output


@pytest.mark.parametrize(
    "options, message",
    [
        (["--sampler", "euler"], "Invalid value for '--sampler': 'euler' is not one of 'ddim', 'dpmsolver++'"),
        (["--steps", "0"], "Invalid value for '--steps'"),
        (["--anatomy-steps", "-1"], "Invalid value for '--anatomy-steps'"),
        (["--steps", "10", "--anatomy-steps", "11"], "--anatomy-steps 11 is more than the 10 steps"),
        (["--speed", "fast", "--anatomy-steps", "500"], "--anatomy-steps 500 is more than the"),
        (["--sampler", "unipc", "--step-grid", "reference"], "--step-grid reference is the reference's DDIM grid"),
        (["--guidance-interval", "0.5", "0.2"], "--guidance-interval: START must be below STOP"),
        (["--speed", "slow"], "Invalid value for '--speed'"),
    ],
)
def test_bad_sampler_options_exit_2_naming_the_option_and_write_nothing(manifest, tmp_path, options, message):
    out = tmp_path / "out"
    result = run("generate", manifest, "--out", out, *options)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()


def test_a_row_whose_anatomy_steps_exceed_the_runs_steps_is_refused_before_anything_starts(tmp_path):
    write_mask_file(tmp_path / "anatomy.png", box_label_map())
    rows = [{"request_id": "a", "labels": ["No Finding"], "num_samples": 1, "anatomy_path": "anatomy.png"}]
    rows.append({**rows[0], "request_id": "b", "anatomy_steps": 40})
    path = write_manifest(rows, tmp_path / "m.parquet")
    result = run("generate", path, "--out", tmp_path / "out", "--steps", "20")
    assert result.exit_code == 2 and "request 'b'" in result.output
    assert "between 0 and steps (20), got 40" in result.output
    assert not (tmp_path / "out").exists()


def test_sampler_options_become_the_runs_sampler_settings(manifest, tmp_path, monkeypatch):
    """The preset with the options given over it; --steps alone keeps the preset's share of anatomy steps."""
    from xreal.cli import run as run_commands
    from xreal.core.settings import SPEEDS

    seen = []
    monkeypatch.setattr(run_commands, "_preflight", lambda *args, sampler, **kwargs: seen.append(sampler))
    monkeypatch.setattr(run_commands, "_run_parameters", lambda **kwargs: (_ for _ in ()).throw(SystemExit(0)))
    run("generate", manifest, "--out", tmp_path / "o", "--speed", "fast")
    run("generate", manifest, "--out", tmp_path / "o", "--steps", "30")
    run("generate", manifest, "--out", tmp_path / "o", "--sampler", "unipc", "--steps", "12", "--anatomy-steps", "3")
    run("generate", manifest, "--out", tmp_path / "o", "--guidance-interval", "0", "0.5")
    run("generate", manifest, "--out", tmp_path / "o", "--speed", "fast", "--steps", "10")
    run("generate", manifest, "--out", tmp_path / "o", "--guidance-scale", "4", "--healthy-guidance", "2.5")
    run("generate", manifest, "--out", tmp_path / "o", "--speed", "fast", "--healthy-guidance", "1")
    run(
        "generate",
        manifest,
        "--out",
        tmp_path / "o",
        "--finding-guidance",
        "edema=3",
        "--finding-guidance=Lung Lesion=7",
    )
    run("generate", manifest, "--out", tmp_path / "o", "--speed", "fast", "--finding-guidance", "Atelectasis=9")
    run("generate", manifest, "--out", tmp_path / "o", "--speed", "fast", "--guidance-scale", "4")
    assert seen[0] == SPEEDS["fast"]
    assert (seen[1].sampler, seen[1].steps, seen[1].anatomy_steps) == ("ddim", 30, 15)
    assert (seen[2].sampler, seen[2].steps, seen[2].anatomy_steps) == ("unipc", 12, 3)
    assert seen[3].guidance_interval == (0.0, 0.5) and seen[3].steps == 100
    assert (seen[4].sampler, seen[4].steps, seen[4].anatomy_steps) == ("dpmsolver++", 10, 9)  # fast: 7/8 of stage 1
    assert (seen[5].guidance_scale, seen[5].healthy_guidance_scale, seen[5].sampler) == (4.0, 2.5, "ddim")
    assert (seen[6].guidance_scale, seen[6].healthy_guidance_scale) == (SPEEDS["fast"].guidance_scale, 1.0)
    assert seen[7].finding_guidance == (("Edema", 3.0), ("Lung Lesion", 7.0)) and seen[7].guidance_scale == 7.0
    assert dict(seen[8].finding_guidance) == {**dict(SPEEDS["fast"].finding_guidance), "Atelectasis": 9.0}
    assert seen[9].finding_guidance == () and seen[9].guidance_scale == 4.0  # one scale for every finding


@pytest.mark.parametrize(
    ("entry", "message"),
    [("Edema", "expected LABEL=VALUE"), ("Oedema=3", "unknown pathology label"), ("Edema=x", "could not convert")],
)
def test_a_bad_finding_guidance_entry_exits_2_naming_it(manifest, tmp_path, entry, message):
    result = run("generate", manifest, "--out", tmp_path / "o", "--finding-guidance", entry)
    assert result.exit_code == 2 and f"--finding-guidance {entry!r}" in result.output and message in result.output
    assert not (tmp_path / "o").exists()


def test_sampler_quality_runs_each_of_its_settings_as_it_is(manifest, tmp_path, monkeypatch):
    """The benchmark's xreal generate options rebuild every setting it compares, guidance included (stop 30's fast
    row was drawn at the reference's guidance 7: the options carried the preset's sampler and steps only)."""
    import importlib.util
    from pathlib import Path

    from xreal.cli import run as run_commands

    path = Path(__file__).parents[1] / "benchmarks" / "sampler_quality.py"
    monkeypatch.syspath_prepend(str(path.parent))  # it imports control_phantom beside it
    spec = importlib.util.spec_from_file_location("sampler_quality", path)
    benchmark = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "sampler_quality", benchmark)  # its dataclasses look their module up
    spec.loader.exec_module(benchmark)
    seen = []
    monkeypatch.setattr(run_commands, "_preflight", lambda *args, sampler, **kwargs: seen.append(sampler))
    monkeypatch.setattr(run_commands, "_run_parameters", lambda **kwargs: (_ for _ in ()).throw(SystemExit(0)))
    for setting in benchmark.SETTINGS:
        run("generate", manifest, "--out", tmp_path / "o", *setting.options)
    assert seen == [setting.settings for setting in benchmark.SETTINGS]


def test_submit_starts_in_seconds_without_torch(manifest, tmp_path):
    """`xreal submit` only talks to a server: it must not pay torch's and diffusers' imports (10 s on 2 cores)."""
    from servers import free_port

    script = (
        "import sys; from xreal.cli import cli\n"
        "try: cli(sys.argv[1:])\n"
        "except SystemExit as e: print('exit', e.code, 'torch' in sys.modules, file=sys.stderr)\n"
    )
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api", "PREFECT_HOME": str(tmp_path)}
    args = [sys.executable, "-c", script, "submit", str(manifest), "--out", str(tmp_path / "o"), "--device", "cuda:1"]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert "cannot reach the Prefect server" in result.stderr, result.stderr
    assert result.stderr.strip().endswith("exit 2 False"), result.stderr


def test_submit_sends_only_the_options_given_as_absolute_paths(manifest, tmp_path, monkeypatch):
    import flows.deploy

    sent = {}

    def fake_submit(deployment, path, out, parameters, wait=False):
        sent.update(deployment=deployment, parameters=parameters)
        raise click.exceptions.Exit(0)

    monkeypatch.setattr(flows.deploy, "submit_generation", fake_submit)
    policy = tmp_path / "policy.yaml"
    policy.write_text("retries: {max_rounds: 2}\n")
    result = run("submit", manifest, "--out", "o", "--device", "cuda:1", "--policy", policy, "--batch-size", "4")
    assert result.exit_code == 0, result.output
    # cuda:1 is the serving machine's business, not this one's; the rest keep the deployment's defaults
    assert sent["parameters"] == {"devices": ["cuda:1"], "policy": str(policy.resolve()), "batch_size": 4}
    assert sent["deployment"] == "generate-dataset"
    result = run("submit", manifest, "--out", "o", "--sampler", "dpmsolver++", "--steps", "10")
    assert result.exit_code == 0, result.output
    assert sent["parameters"] == {
        "sampler": {**SamplerSettings().to_dict(), "sampler": "dpmsolver++", "steps": 10, "anatomy_steps": 5}
    }


def test_train_demo_passes_its_oversampled_findings_on_and_refuses_a_bad_entry(tmp_path, monkeypatch):
    import xreal.model.training as training

    seen = []
    monkeypatch.setattr(training, "train_demo_bundle", lambda *args, **kwargs: seen.append(kwargs) or tmp_path / "b")
    paths = ["train", "demo", "--index", tmp_path / "i", "--work", tmp_path / "w", "--out", tmp_path / "b"]
    assert run(*paths, "--oversample", "lung lesion=4", "--oversample", "Atelectasis=2.5").exit_code == 0
    assert run(*paths).exit_code == 0
    assert [kwargs["findings_oversample"] for kwargs in seen] == [{"Lung Lesion": 4.0, "Atelectasis": 2.5}, None]
    result = run(*paths, "--oversample", "Nodule=4")
    assert result.exit_code == 2 and "--oversample 'Nodule=4'" in result.output and len(seen) == 2
