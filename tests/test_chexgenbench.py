"""The CheXGenBench export: accepted images as 8-bit PNGs, a prompt table in the benchmark's columns, a README."""

from __future__ import annotations

import ast
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from test_utility import generated_run

from xreal.cli import cli
from xreal.core.errors import XRealError
from xreal.core.images import read_image
from xreal.evaluate.chexgenbench import CSV_FILE, MIMIC_LABEL_ORDER, export_chexgenbench


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the demo model is small; two threads on a busy two-core machine spin far slower
    try:
        yield generated_run(tmp_path_factory.mktemp("chexgenbench"))
    finally:
        torch.set_num_threads(threads)


def test_every_accepted_sample_is_exported_with_its_pixels_and_prompt(run, tmp_path):
    samples = pq.read_table(run / "samples.parquet").to_pandas()
    accepted = samples[samples.decision == "accepted"]
    assert len(accepted) == 2 and (samples.decision == "rejected").sum() == 2  # the fixture keeps rejected images
    out = export_chexgenbench(run, tmp_path / "export", size=None)
    table = pd.read_csv(out / CSV_FILE, keep_default_na=False)
    assert sorted(table.sample_id) == sorted(accepted.sample_id)  # every accepted sample, no rejected one
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{s}.png" for s in accepted.sample_id)
    for row in table.itertuples():
        source = accepted[accepted.sample_id == row.sample_id].iloc[0]
        with Image.open(out / "images" / row.img_savename) as image:
            assert image.mode == "L"
            pixels = np.asarray(image)
        expected = np.round(read_image(run / source.image_path) * 255.0).astype(np.uint8)
        assert np.array_equal(pixels, expected)
        assert row.synthetic_filename == row.img_savename == f"{row.sample_id}.png"
        assert row.prompt == row.annotated_prompt == row.xreal_prompt == "Cardiomegaly" and row.labels == "Cardiomegaly"
        labels = ast.literal_eval(row.chexpert_labels)
        assert tuple(labels) == MIMIC_LABEL_ORDER and MIMIC_LABEL_ORDER[:3] == (
            "Atelectasis",
            "Cardiomegaly",
            "Consolidation",
        )
        assert labels["Cardiomegaly"] == 1.0 and sum(labels.values()) == 1.0
    readme = (out / "README.md").read_text()
    assert "synthetic" in readme and CSV_FILE in readme and "LLAVARAD_ANNOTATIONS_TEST.csv" in readme
    assert "comparable with the leaderboard only when the manifest was built from that test split" in readme


def test_images_are_resized_to_the_benchmark_resolution(run, tmp_path):
    out = export_chexgenbench(run, tmp_path / "export")
    for path in (out / "images").iterdir():
        with Image.open(path) as image:
            assert image.size == (512, 512) and image.mode == "L"
            back = np.asarray(image.resize((64, 64), Image.Resampling.BOX), dtype=np.float32) / 255.0
        original = read_image(run / "images" / path.name)
        assert np.abs(back - original).mean() < 0.02


def test_unfinished_runs_and_used_folders_are_refused(run, tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    with pytest.raises(XRealError, match="already exists and is not an empty folder"):
        export_chexgenbench(run, used)
    assert [p.name for p in used.iterdir()] == ["keep.txt"]
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    (unfinished / "dataset.json").unlink()
    with pytest.raises(XRealError, match="unfinished: not a finished xreal run"):
        export_chexgenbench(unfinished, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    assert (export_chexgenbench(run, tmp_path / "empty", size=None) / CSV_FILE).is_file()  # an empty folder is fine


def test_the_command_exports_and_refuses_with_exit_2(run, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(cli, ["export", "chexgenbench", str(run), "--out", str(tmp_path / "x"), "--size", "0"])
    assert ok.exit_code == 0, ok.output
    assert "wrote 2 images" in ok.output and (tmp_path / "x" / CSV_FILE).is_file()
    again = runner.invoke(cli, ["export", "chexgenbench", str(run), "--out", str(tmp_path / "x")])
    assert again.exit_code == 2 and "not an empty folder" in again.output
