"""Nothing a run reads or writes changes unnoticed: judge sets, bundles, input files, the finalized records,
samples.parquet, and what a killed writer leaves behind (issue 13, items 2-6 and 14)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_generate_flow import xreal

from xreal.core.errors import XRealError
from xreal.core.files import write_json
from xreal.core.masks import write_mask_file
from xreal.core.records import DEMO_BUNDLE, JudgeError, record_bundle_files, verify_bundle, verify_judge_set
from xreal.core.settings import SPEEDS
from xreal.manifest.schema import InputChanged, write_manifest
from xreal.run import dataset, generation
from xreal.run.audit import audit_run
from xreal.run.dataset import DatasetError, XRealDataset
from xreal.run.generation import RunConfig, RunConflict, make_batches, plan
from xreal.run.policy import QualityPolicy
from xreal.run.verify import verify_files, verify_run_models

# The fast preset's step counts: at 4 + 4 DDIM steps the demo bundle draws what its judges call a pneumothorax on
# nearly every image, and these runs need the gate to accept some draws and reject others.
FAST = {"steps": SPEEDS["fast"].steps, "anatomy_steps": SPEEDS["fast"].anatomy_steps}


def tiny_manifest(path, **extra):
    rows = [
        {"request_id": "cardio", "labels": ["Cardiomegaly"], "num_samples": 2, "anatomy_template": "phantom-1",
         "boxes": [{"label": None, "x_min": 0.35, "y_min": 0.46, "x_max": 0.76, "y_max": 0.78}], "seed": 3, **FAST},
        {"request_id": "healthy", "labels": ["No Finding"], "num_samples": 1, "anatomy_template": "phantom-2",
         "seed": 3, **FAST},
    ]  # fmt: skip
    return write_manifest(rows, path)


def run_all(config: RunConfig) -> generation.RunState:
    """Open, draw every planned batch and finalize, in this process (no Prefect)."""
    state = generation.open_run(config)
    for batch in make_batches(plan(state.requests, state.decisions, 1), batch_size=4):
        generation.run_batch(config, batch, "cpu", state.run_id)
    state.refresh()
    generation.finalize(state)
    return state


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    copy = tmp_path_factory.mktemp("bundle") / "demo"
    shutil.copytree(DEMO_BUNDLE, copy)
    return copy


@pytest.fixture(scope="module")
def finished(tmp_path_factory, bundle):
    tmp = tmp_path_factory.mktemp("finished")
    strict = QualityPolicy.from_dict({"anatomy": {"min_dice": {"heart": 0.999}}, "retries": {"max_rounds": 1}})
    config = RunConfig(
        manifest=tiny_manifest(tmp / "m.parquet"), out=tmp / "out", model=bundle, keep_rejected=True, policy=strict
    )
    run_all(config)
    assert set(pq.read_table(config.out / "samples.parquet").column("decision").to_pylist()) == {"accepted", "rejected"}
    return config


def test_a_judge_record_edit_is_caught_by_verify_and_by_the_run_identity(bundle, tmp_path):
    """Item 2: thresholds, labels and file names in judges.json are pinned by the bundle's record and the run."""
    edited = tmp_path / "demo"
    shutil.copytree(bundle, edited)
    judges = edited / "judges" / "judges.json"
    record = json.loads(judges.read_text())
    record["realism"]["threshold"] *= 10  # still a valid judge set, now judging differently
    write_json(judges, record)
    verify_judge_set(edited / "judges")  # its own record cannot see it ...
    with pytest.raises(XRealError, match=r"judges/judges.json does not match its checksum"):
        verify_files([edited])  # ... the bundle's record does

    record["classifier"]["file"] = "other.safetensors"  # a judge pointed at a file no checksum covers
    (edited / "judges" / "other.safetensors").write_bytes((edited / "judges" / "classifier.safetensors").read_bytes())
    write_json(judges, record)
    with pytest.raises(JudgeError, match=r"classifier file 'other.safetensors' is not among the checksummed files"):
        verify_judge_set(edited / "judges")


def test_an_interrupted_run_resumes_only_with_the_judges_and_bundle_it_started_with(finished, tmp_path):
    """Item 2: a run interrupted, its judge thresholds edited (records rewritten to match), then resumed, is refused."""
    moved = tmp_path / "demo"
    shutil.copytree(finished.model, moved)
    out = tmp_path / "out"
    shutil.copytree(finished.out, out)
    config = RunConfig(manifest=finished.manifest, out=out, model=moved, keep_rejected=True, policy=finished.policy)
    generation.open_run(config)  # a copy of the same bundle elsewhere is the same run
    started = tmp_path / "started"  # a run whose run.json names the copy
    generation.open_run(
        RunConfig(manifest=finished.manifest, out=started, model=moved, keep_rejected=True, policy=finished.policy)
    )
    judges = moved / "judges" / "judges.json"
    record = json.loads(judges.read_text())
    record["classifier"]["op_threshs"] = [0.5] * len(record["classifier"]["op_threshs"])
    write_json(judges, record)
    record_bundle_files(moved)  # someone covers their tracks: every checksum matches again
    verify_bundle(moved)
    with pytest.raises(RunConflict, match="model_digest, judges"):
        generation.open_run(config)
    with pytest.raises(XRealError, match=r"is not the .* that .* was made with"):
        verify_run_models(started)
    assert any("judge set" in line for line in verify_run_models(finished.out))
    # a worker that loads the judges after the run opened compares them with the run's pins too
    pinned = json.loads((out / "run.json").read_text())["identity"]
    with pytest.raises(RunConflict, match="changed since this run started"):
        generation.worker_models(moved, str(moved / "judges"), "cpu", expected=pinned)


def test_a_bundle_with_a_file_its_record_does_not_list_is_refused(bundle, tmp_path):
    edited = tmp_path / "demo"
    shutil.copytree(bundle, edited)
    (edited / "unet" / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(XRealError, match=r"unet/extra.safetensors is not in the bundle's record"):
        verify_bundle(edited)


def test_files_a_manifest_names_are_pinned_when_the_run_opens(tmp_path, label_map):
    """Item 3: an anatomy or mask file changed between an interrupted run and its resume, or during it, is refused."""
    from conftest import box_label_map

    write_mask_file(tmp_path / "anatomy.png", label_map)
    mask = np.zeros_like(label_map, dtype=bool)
    mask[30:40, 10:20] = True
    write_mask_file(tmp_path / "lesion.png", mask)
    rows = [{"request_id": "a", "labels": ["Lung Lesion"], "num_samples": 1, "anatomy_path": "anatomy.png",
             "pathology_mask_path": "lesion.png", **FAST}]  # fmt: skip
    config = RunConfig(manifest=write_manifest(rows, tmp_path / "m.parquet"), out=tmp_path / "out")
    state = generation.open_run(config)
    assert set(state.record["inputs"]) == {"anatomy.png", "lesion.png"}
    request = state.requests[0]
    assert request.anatomy_map(64).shape == label_map.shape

    write_mask_file(tmp_path / "anatomy.png", box_label_map(heart_width=24))  # another valid anatomy
    with pytest.raises(InputChanged, match=r"anatomy.png: this anatomy file changed since the run started"):
        request.anatomy_map(64)  # a batch of the open run reads it
    with pytest.raises(RunConflict, match=r"inputs_digest \(files that differ: anatomy.png\)"):
        generation.open_run(config)  # the resume
    write_mask_file(tmp_path / "anatomy.png", label_map)
    generation.open_run(config)  # restored: the run resumes


def test_a_finalize_that_did_not_finish_is_redone_and_the_card_is_never_lost(finished, tmp_path, monkeypatch):
    """Item 4: dataset.json is written last; a crash before it, or a derived file lost after it, is finalized again."""
    out = tmp_path / "out"
    shutil.copytree(finished.out, out)
    config = dataclasses.replace(finished, out=out)
    (out / "README.md").unlink()
    state = generation.open_run(config)
    assert generation.finished_summary(state) is None  # not "already complete": the card is missing
    (out / "dataset.json").unlink()

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt  # the process dies inside finalize, after the table, before the card

    monkeypatch.setattr(dataset, "write_card", killed)
    with pytest.raises(KeyboardInterrupt):
        generation.finalize(state)
    monkeypatch.undo()
    assert not (out / "dataset.json").exists() and generation.finished_summary(state) is None
    generation.finalize(state)
    assert "every image in this folder is synthetic" in (out / "README.md").read_text().lower()
    assert generation.finished_summary(generation.open_run(config)) is not None
    assert audit_run(out).consistent, audit_run(out).to_text()


def test_the_audit_checks_the_card_the_preview_and_the_hugging_face_metadata(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished.out, out)
    (out / "README.md").write_text((out / "README.md").read_text().replace("synthetic", "real"))
    (out / "images" / "metadata.jsonl").write_text("")
    report = audit_run(out)
    assert not report.consistent
    assert "README.md (pinned in dataset.json)" in report.changed_files
    assert "images/metadata.jsonl (pinned in dataset.json)" in report.changed_files
    assert "README.md does not say that every image is synthetic" in report.problems


def _rewrite(path, table):
    pq.write_table(table, path)


def test_an_edited_samples_table_is_caught_by_the_audit_and_refused_by_the_loader(finished, tmp_path):
    """Item 5: a flipped label column or swapped decisions are found, even with dataset.json's pin rewritten."""
    out = tmp_path / "out"
    shutil.copytree(finished.out, out)
    table = pq.read_table(out / "samples.parquet")
    frame = table.to_pandas()
    decisions = frame.decision.tolist()
    accepted, rejected = decisions.index("accepted"), decisions.index("rejected")
    flipped = next(i for i in range(len(frame)) if i not in (accepted, rejected))
    first = frame.sample_id[flipped]
    frame.loc[flipped, "Edema"] = 1.0  # a label users load, flipped
    frame.loc[[accepted, rejected], "decision"] = ["rejected", "accepted"]  # totals unchanged
    _rewrite(out / "samples.parquet", pa.Table.from_pandas(frame, schema=table.schema, preserve_index=False))

    with pytest.raises(DatasetError, match="edited"):
        XRealDataset(out)
    report = audit_run(out)
    assert "samples.parquet (pinned in dataset.json)" in report.changed_files
    assert any(p.startswith(f"sample {first}: Edema differ from shards/") for p in report.problems), report.problems
    assert any(f"sample {first}: label column(s) Edema disagree" in p for p in report.problems)
    swapped = frame.sample_id[accepted]
    assert f"sample {swapped}: decision differ from shards/" in "\n".join(report.problems), report.problems
    assert any(f"sample {swapped}: rejected but its image_path is images/" in p for p in report.problems)

    record = json.loads((out / "dataset.json").read_text())  # the pin rewritten to match: the shards still know
    record["files"]["samples.parquet"] = dataset.pinned_files(out)["samples.parquet"]
    write_json(out / "dataset.json", record)
    report = audit_run(out)
    assert not report.changed_files and any("Edema differ from shards/" in p for p in report.problems)


def test_temporary_files_of_a_killed_writer_are_never_read_as_shards(finished, tmp_path):
    """Item 6: a ``.…part.parquet`` left by kill -9 is not globbed as a shard; finalize removes it."""
    out = tmp_path / "out"
    shutil.copytree(finished.out, out)
    shard = dataset.shard_paths(out)[0]
    partial = out / "shards" / f".{shard.name}.k2j4.part.parquet"
    partial.write_bytes(shard.read_bytes()[:100])  # half a table
    assert dataset.shard_paths(out) == sorted(p for p in (out / "shards").glob("*.parquet") if p != partial)
    report = audit_run(out)
    assert f"shards/{partial.name}" in report.unexpected_files
    config = dataclasses.replace(finished, out=out)
    state = generation.open_run(config)  # resumes: reads the committed shards only
    generation.finalize(state)
    assert not partial.exists() and audit_run(out).consistent


KILL_AT = textwrap.dedent(
    """
    import os, signal, sys
    import {module} as target
    original = target.{function}
    def {function}(*args, **kwargs):
        result = original(*args, **kwargs)
        if {condition}:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    target.{function} = {function}
    from xreal.cli import main
    main(sys.argv[1:])
    """
)


def _args(manifest, out) -> list[str]:
    return ["generate", str(manifest), "--out", str(out), "--quiet", "--keep-rejected"]


def _generate(kill_at: dict | None, manifest, out, env) -> subprocess.CompletedProcess:
    """`xreal generate` in a new process; with ``kill_at``, one that SIGKILLs itself as it says."""
    code = KILL_AT.format(**kill_at) if kill_at else "import sys\nfrom xreal.cli import main\nmain(sys.argv[1:])"
    args = [sys.executable, "-c", code, *_args(manifest, out)]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_sigkill_inside_finalize_and_inside_a_shard_write_then_resume(prefect_api, tmp_path):
    """Items 4 and 6 with real SIGKILLs of a real ``xreal generate``: after the card is written and before
    dataset.json, and while a shard's table is half written. Each rerun completes the same dataset as a run never
    killed. The run killed in finalize drew every image without a break: it is the never-killed reference. Images
    that are compared are drawn in new processes: in this one, after the rest of the suite, the same requests come out
    with other float32 bytes. The rerun that only finalizes runs in this process."""
    manifest = tiny_manifest(tmp_path / "m.parquet")
    env = {**os.environ, "PREFECT_API_URL": prefect_api}

    in_finalize = tmp_path / "finalize"
    killed = _generate({"module": "xreal.run.dataset", "function": "write_card", "condition": "True"},
                       manifest, in_finalize, env)  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    assert (in_finalize / "README.md").is_file() and not (in_finalize / "dataset.json").exists()
    (in_finalize / "README.md").unlink()  # the crash the issue saw: the card lost
    rerun = xreal(*_args(manifest, in_finalize))
    assert rerun.exit_code == 0 and "already complete" not in rerun.output, rerun.output
    assert "synthetic" in (in_finalize / "README.md").read_text()

    in_shard = tmp_path / "shard"
    killed = _generate(
        {"module": "pyarrow.parquet", "function": "write_table", "condition": "'shards' in str(args[1])"},
        manifest, in_shard, env,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    leftovers = list((in_shard / "shards").glob(".*.part.parquet"))
    assert leftovers and not dataset.shard_paths(in_shard)
    rerun = _generate(None, manifest, in_shard, env)  # draws every image: in a new process, as the reference
    assert rerun.returncode == 0, rerun.stderr
    assert not list((in_shard / "shards").glob(".*"))
    for out in (in_finalize, in_shard):
        assert audit_run(out).consistent, audit_run(out).to_text()
    same = ["sample_id", "decision", "content_sha256"]
    drawn = pq.read_table(in_finalize / "samples.parquet", columns=same)
    assert pq.read_table(in_shard / "samples.parquet", columns=same) == drawn
    assert drawn.num_rows >= 3  # at least one draw for each of the manifest's 2 + 1 samples


def test_a_checkpoint_naming_a_code_running_function_is_named_and_never_loaded(tmp_path):
    """Item 14: torch 2.14 words its refusal of a blocked module differently; the message still says what is in it."""
    import argparse

    import torch

    from xreal.model.reference import ReferenceImportError, read_checkpoint

    class Command:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    torch.save({"state_dict": {"w": torch.zeros(2)}, "callback": Command()}, tmp_path / "evil.pth")
    with pytest.raises(ReferenceImportError, match=r"names posix.system, which would run a command"):
        read_checkpoint(tmp_path / "evil.pth")
    assert not (tmp_path / "ran").exists()

    torch.save({"state_dict": {"w": torch.zeros(2)}, "hparams": argparse.Namespace(lr=1)}, tmp_path / "ns.pth")
    with pytest.raises(ReferenceImportError, match=r"Python objects other than tensors \(argparse.Namespace\)") as e:
        read_checkpoint(tmp_path / "ns.pth")
    assert "torch.save(c.get('state_dict', c)" in str(e.value)
