"""The judges on real phantom images: they accept what matches the request and reject what does not."""

import shutil

import numpy as np
import pytest
import torch

from xreal.core.weights import import_xrv
from xreal.judges.judging import CPU_CHUNK, JudgeError, RealismReference, in_chunks, load_judges, sanity_scores
from xreal.model.bundle import DEMO_BUNDLE
from xreal.phantom import renderer as phantom
from xreal.run.policy import QualityPolicy

JUDGES = DEMO_BUNDLE / "judges"


CHESTX_DET_TARGETS = tuple(import_xrv().baseline_models.chestx_det.PSPNet.targets)


@pytest.fixture(scope="module")
def judges():
    return load_judges(JUDGES)


@pytest.fixture(scope="module")
def cases():
    return phantom.generate(
        4, 64, seed=4321, pathologies=[["Cardiomegaly"], [], ["Pleural Effusion"], ["Pneumothorax"]]
    )


def decide(judges, images, anatomy, labels):
    rows = judges.score(images, anatomy)
    return [
        QualityPolicy().decide(r, lab, judges.labels, judges.realism_threshold)
        for r, lab in zip(rows, labels, strict=True)
    ]


def test_the_demo_judges_carry_their_labels_and_thresholds(judges):
    assert judges.labels == list(phantom.PHANTOM_PATHOLOGIES)
    assert judges.classifier.op_threshs.shape == (len(phantom.PHANTOM_PATHOLOGIES),)
    assert judges.realism.threshold > 0 and judges.files


def test_a_judge_accepts_a_correct_image_and_rejects_a_wrong_one(judges):
    kinds = [["Cardiomegaly"], [], ["Pleural Effusion"], ["Pneumothorax"]]
    many = phantom.generate(32, 64, seed=99, pathologies=kinds * 8)
    correct = decide(judges, many.images, many.anatomy, [c.labels for c in many])
    assert np.mean([d.accepted for d in correct]) >= 0.75, [d.reason for d in correct]
    swapped = {
        "Cardiomegaly": ["Pneumothorax"],
        "No Finding": ["Cardiomegaly"],
        "Pleural Effusion": ["No Finding"],
        "Pneumothorax": ["Edema"],
    }
    wrong = decide(judges, many.images, many.anatomy, [swapped[c.labels[0]] for c in many])
    assert np.mean([d.accepted for d in wrong]) <= 0.05, [d.reason for d in wrong]
    assert "Pneumothorax not detected" in wrong[0].reason
    assert "unrequested Pleural Effusion detected" in wrong[2].reason


def test_the_demo_judges_read_a_phantom_through_the_bundles_autoencoder_as_the_phantom(judges, pipe):
    """Every generated image has the decoder's texture. Judges that never saw it called a pneumothorax on 47% of
    oedema phantoms passed through the autoencoder (0% on the phantoms) and rejected every oedema `make demo` drew;
    these trained through it keep their findings and call nothing else."""
    labels = [["Edema"], ["Consolidation"], []] * 16
    cases = phantom.generate(len(labels), 64, seed=5150, pathologies=labels)
    returned = pipe.round_trip(cases.images)
    decisions = decide(judges, returned, cases.anatomy, [c.labels for c in cases])
    accepted = np.mean([d.accepted for d in decisions])
    assert accepted >= 0.85, [d.reason for d in decisions if not d.accepted]
    pneumothorax = np.mean([row["p_pneumothorax"] >= 0.5 for row in judges.score(returned)])
    assert pneumothorax <= 0.05
    # and they still find the oedema through it.
    assert np.mean([row["p_edema"] >= 0.5 for row in judges.score(returned[::3])]) >= 0.9


def test_anatomy_judge_compares_with_the_requested_anatomy(judges, cases):
    other = np.roll(cases.anatomy, 16, axis=1)  # everything a quarter of the image to the side
    rows = judges.score(cases.images, other)
    assert all(r["dice_heart"] < 0.6 and r["dice_right_lung"] < 0.7 for r in rows)
    own = judges.score(cases.images, cases.anatomy)
    assert all(r["dice_right_lung"] > 0.9 and r["dice_heart"] > 0.8 for r in own)


def test_sanity_and_realism_catch_broken_images(judges, cases):
    broken = np.stack([np.zeros((64, 64)), np.full((64, 64), np.nan), cases.images[2], 1.0 - cases.images[3]])
    decisions = decide(judges, broken.astype(np.float32), cases.anatomy, [["No Finding"]] * 4)
    assert "blank or constant" in decisions[0].reason
    assert "NaN" in decisions[1].reason
    rows = judges.score(broken.astype(np.float32), cases.anatomy)
    assert rows[3]["realism_distance"] > judges.realism.threshold  # an inverted X-ray is unlike any phantom
    assert sanity_scores(cases.images[0])["sanity_std"] > 0.05


def test_realism_reference_distance():
    torch.manual_seed(0)
    features = torch.randn(500, 4)
    reference = RealismReference.fit(features, torch.randn(200, 4))
    near, far = reference.distance(torch.zeros(1, 4)), reference.distance(torch.full((1, 4), 8.0))
    assert near[0] < 1.0 < reference.threshold < far[0]


def test_a_damaged_judge_file_is_refused(tmp_path):
    copy = tmp_path / "judges"
    shutil.copytree(JUDGES, copy)
    data = bytearray((copy / "classifier.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "classifier.safetensors").write_bytes(bytes(data))
    with pytest.raises(JudgeError, match=r"classifier\.safetensors does not match its checksum"):
        load_judges(copy)
    shutil.copy(JUDGES / "classifier.safetensors", copy / "classifier.safetensors")
    load_judges(copy)
    (copy / "segmenter.safetensors").unlink()
    with pytest.raises(JudgeError, match=r"segmenter\.safetensors is missing"):
        load_judges(copy)
    with pytest.raises(JudgeError, match="not a judge set"):
        load_judges(tmp_path)


@pytest.fixture(scope="module")
def xrv_cache(tmp_path_factory):
    """A weight cache holding densenet121-res224-all in torchxrayvision's own format (random weights), locked."""
    from xreal.core.weights import import_xrv, record_weights, weights_info

    folder = tmp_path_factory.mktemp("xrv-weights")
    torch.manual_seed(0)
    torch.save(import_xrv().models.DenseNet(weights=None), folder / weights_info("densenet121-res224-all").file)
    record_weights(["densenet121-res224-all"], folder)
    return folder


def test_torchxrayvision_judges_load_through_the_lock_and_score_any_size(xrv_cache, cases, monkeypatch):
    monkeypatch.setenv("XREAL_WEIGHTS_DIR", str(xrv_cache))
    judges = load_judges("torchxrayvision", anatomy=False, realism=False)
    assert judges.kind == "torchxrayvision" and judges.image_size == 224
    assert {"Cardiomegaly", "Pleural Effusion", "Lung Opacity"} <= set(judges.labels)  # xrv's "Effusion" mapped
    assert "Infiltration" not in judges.labels  # outside the CheXpert vocabulary: scored, not judged
    rows = judges.score(cases.images, cases.anatomy)
    assert len(rows) == 4 and all(0 <= r["p_pleural_effusion"] <= 1 and "p_infiltration" in r for r in rows)
    assert "dice_heart" not in rows[0] and "realism_distance" not in rows[0]  # no segmenter, no reference
    decision = QualityPolicy().decide(rows[0], ["Cardiomegaly"], judges.labels, None)
    assert decision.reason  # decided on the classifier and sanity alone


def test_a_tampered_torchxrayvision_file_is_never_unpickled(xrv_cache, tmp_path, monkeypatch):
    from xreal.core.weights import WeightsError, weights_info

    copy = tmp_path / "weights"
    shutil.copytree(xrv_cache, copy)
    with open(copy / weights_info("densenet121-res224-all").file, "ab") as fh:
        fh.write(b"\0")
    monkeypatch.setenv("XREAL_WEIGHTS_DIR", str(copy))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran on a file that failed its hash"))
    with pytest.raises(WeightsError, match="sha256"):
        load_judges("torchxrayvision", anatomy=False, realism=False)
    (copy / weights_info("densenet121-res224-all").file).unlink()
    with pytest.raises(WeightsError, match="xreal weights fetch"):
        load_judges("torchxrayvision", anatomy=False, realism=False)


def test_torchxrayvision_realism_is_the_autoencoders_reconstruction_error(xrv_cache, cases, monkeypatch):
    from xreal.core.weights import WeightsError, import_xrv, record_weights, weights_info
    from xreal.judges.judging import ReconstructionError

    monkeypatch.setenv("XREAL_WEIGHTS_DIR", str(xrv_cache))
    with pytest.raises(WeightsError, match="101-elastic"):  # realism on: its weights are needed too
        load_judges("torchxrayvision", anatomy=False, realism=True)
    torch.manual_seed(1)
    autoencoder = import_xrv().autoencoders.ResNetAE101()
    torch.save(autoencoder.state_dict(), xrv_cache / weights_info("101-elastic").file)
    record_weights(["101-elastic"], xrv_cache)
    judges = load_judges("torchxrayvision", anatomy=False, realism=True)
    assert isinstance(judges.realism, ReconstructionError) and judges.realism_threshold is None
    assert len(judges.files) == 2
    rows = judges.score(cases.images[:2])
    inputs = torch.nn.functional.interpolate(
        torch.from_numpy(cases.images[:2])[:, None] * 2048 - 1024, size=(224, 224), mode="bilinear"
    )
    with torch.no_grad():
        expected = (autoencoder.eval()(inputs)["out"] - inputs).abs().mean((1, 2, 3)) / 2048
    assert [r["realism_distance"] for r in rows] == pytest.approx(expected.tolist(), rel=1e-4)
    policy = QualityPolicy.from_dict({"realism": {"max_distance": 1e-9}})
    assert "unlike real images" in policy.decide(rows[0], ["Cardiomegaly"], judges.labels, None).reason


def test_chestx_det_probabilities_become_an_anatomy_label_map():
    from xreal.judges.judging import pspnet_label_scores

    targets = CHESTX_DET_TARGETS
    p = torch.zeros(1, 14, 4, 4)
    p[0, targets.index("Right Lung"), :, 0] = 0.9  # image left: the patient's right lung
    p[0, targets.index("Left Lung"), :, 3] = 0.8
    p[0, targets.index("Heart"), 2:, 2:] = 0.6  # overlaps the left lung at the bottom right
    p[0, targets.index("Spine"), :, 1] = 0.99  # not an anatomy class: background
    labels = pspnet_label_scores(p, targets).argmax(1)[0].numpy()
    assert labels.tolist() == [[1, 0, 0, 2], [1, 0, 0, 2], [1, 0, 3, 3], [1, 0, 3, 3]]


def test_chestx_det_pspnet_loads_through_the_lock_as_the_anatomy_judge(xrv_cache, tmp_path, monkeypatch):
    from torchxrayvision.baseline_models.chestx_det.ptsemseg.pspnet import pspnet

    from xreal.core.weights import record_weights, weights_info
    from xreal.judges.judging import XRVAnatomySegmenter

    cache = tmp_path / "weights"
    shutil.copytree(xrv_cache, cache)
    torch.manual_seed(2)
    network = pspnet(14)
    saved = {f"module.{k}": v for k, v in network.state_dict().items()}  # the checkpoint's DataParallel names
    torch.save(saved, cache / weights_info("chestx_det").file)
    record_weights(["chestx_det"], cache)
    monkeypatch.setenv("XREAL_WEIGHTS_DIR", str(cache))
    judges = load_judges("torchxrayvision", anatomy=True, realism=False)
    assert isinstance(judges.segmenter, XRVAnatomySegmenter) and len(judges.files) == 2
    loaded = judges.segmenter.pspnet.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in network.state_dict().items())


def test_the_pspnet_adapter_turns_network_outputs_into_label_scores():
    from xreal.judges.judging import XRVAnatomySegmenter

    class Network(torch.nn.Module):  # stands in for PSPNet's output layout: 14 logits per pixel at 512 px
        targets = CHESTX_DET_TARGETS

        def forward(self, x):
            self.seen = x
            logits = torch.full((x.shape[0], 14, 512, 512), -10.0)
            logits[:, 5, :, :256] = 10.0  # Right Lung on the image's left half
            logits[:, 8, 256:, 256:] = 10.0  # Heart, bottom right
            return logits

    network = Network()
    labels = XRVAnatomySegmenter(network)(torch.full((1, 1, 64, 64), 0.25)).argmax(1)[0]
    assert network.seen.min() == network.seen.max() == 0.25 * 2048 - 1024  # torchxrayvision's value range
    assert labels.shape == (64, 64)
    assert (labels[:, :30] == 1).all() and (labels[40:, 40:] == 3).all() and (labels[:20, 40:] == 0).all()


def test_judges_on_a_cpu_run_channels_last_in_chunks_and_score_as_in_one_call(judges):
    """The speed-ups of `benchmarks/judge_speed.py`: weights in channels-last layout on a CPU, and a batch fed in
    chunks, whose outputs match the whole batch's to float rounding (to the bit on some CPUs; on AVX-512 ones the
    kernels picked for 32 and 37 images differ and scores move by about 1e-8)."""
    for network in (judges.classifier, judges.feature_model, judges.segmenter):
        convolutions = [m.weight for m in network.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[1] > 1]
        assert convolutions and all(w.is_contiguous(memory_format=torch.channels_last) for w in convolutions)
        assert not any(w.is_contiguous() for w in convolutions if w.shape[2] > 1)  # NCHW is another order
    images = phantom.generate(CPU_CHUNK + 5, 64, seed=5).images
    inputs = judges.classifier_inputs(images)
    calls = []

    def network(x):
        calls.append(len(x))
        return judges.classifier(x)

    with torch.no_grad():
        chunked, whole = in_chunks(network, inputs), judges.classifier(inputs)
    assert calls == [CPU_CHUNK, 5]
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    assert judges.features(images).shape[0] == CPU_CHUNK + 5


def test_the_demo_judges_find_nine_in_ten_atelectasis_plates_and_keep_their_specificity(judges):
    """Issue 18's judge goal on 1200 fresh phantoms (seeds 31 and 32, 201 with atelectasis), at the set's calibrated
    operating point: the checkpoint ensemble finds 0.891 of the plates of atelectasis (179), at specificity 0.969
    (stop 38's ensemble, before the judges were retrained through the stop-39 decoder, 0.900); the single 1500-step
    classifier before it found 0.866 (0.954). Atelectasis is the label it finds least."""
    from xreal.judges.phantom_judges import classify

    cases = [phantom.generate(600, 64, seed=seed) for seed in (31, 32)]
    scores = [classify(judges.classifier, c.images, judges.image_size)["Atelectasis"] for c in cases]  # calibrated
    truth = np.array(["Atelectasis" in found for c in cases for found in c.labels])
    called = np.concatenate(scores) >= 0.5
    assert truth.sum() == 201
    assert called[truth].mean() >= 0.885 and (~called[~truth]).mean() >= 0.95, f"{called[truth].mean():.3f}"
