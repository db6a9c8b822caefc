import datetime

import numpy as np
import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage

from xreal.dicom import SYNTHETIC_NOTE, read_dicom_pixels, write_dicom
from xreal.errors import XRealError

FIELDS = dict(dataset_id="run-1", sample_id="cardio-r0000", description="model demo@abc123, request cardio, seed 7")


def test_round_trip_is_pixel_exact_and_the_object_is_valid(tmp_path):
    image = np.random.default_rng(0).integers(0, 65536, (48, 64), dtype=np.uint16)
    path = write_dicom(tmp_path / "a.dcm", image, pixel_spacing=(0.7, 0.7), **FIELDS)
    assert np.array_equal(read_dicom_pixels(path), image)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.MediaStorageSOPClassUID == SecondaryCaptureImageStorage == ds.SOPClassUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.ConversionType == "SYN" and list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert ds.Modality == "DX" and ds.PhotometricInterpretation == "MONOCHROME2"
    assert (ds.Rows, ds.Columns, ds.BitsStored) == (48, 64, 16)
    assert [float(v) for v in ds.PixelSpacing] == [0.7, 0.7]
    assert ds.ImageComments.startswith(SYNTHETIC_NOTE) and "request cardio, seed 7" in ds.ImageComments
    assert ds.PatientName == "" and ds.PatientID == "" and ds.PatientBirthDate == ""


def test_float_images_are_scaled_to_16_bits(tmp_path):
    image = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    path = write_dicom(tmp_path / "f.dcm", image, **FIELDS)
    pixels = read_dicom_pixels(path)
    assert pixels.dtype == np.uint16 and pixels[0, 0] == 0 and pixels[-1, -1] == 65535


def test_uids_are_new_per_image_and_stable_per_sample(tmp_path):
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    image = np.zeros((8, 8), dtype=np.uint16)
    a = pydicom.dcmread(write_dicom(tmp_path / "a.dcm", image, when=when, **FIELDS))
    again = pydicom.dcmread(write_dicom(tmp_path / "b.dcm", image, when=when, **FIELDS))
    other = pydicom.dcmread(write_dicom(tmp_path / "c.dcm", image, when=when, **{**FIELDS, "sample_id": "x-r0001"}))
    other_run = pydicom.dcmread(write_dicom(tmp_path / "d.dcm", image, when=when, **{**FIELDS, "dataset_id": "run-2"}))
    assert a.SOPInstanceUID == again.SOPInstanceUID
    assert a.SOPInstanceUID != other.SOPInstanceUID and a.SeriesInstanceUID == other.SeriesInstanceUID
    assert a.SeriesInstanceUID != other_run.SeriesInstanceUID
    assert (tmp_path / "a.dcm").read_bytes() == (tmp_path / "b.dcm").read_bytes()


def test_bad_images_and_files(tmp_path):
    with pytest.raises(XRealError, match="2-D grayscale"):
        write_dicom(tmp_path / "x.dcm", np.zeros((2, 8, 8), np.uint16), **FIELDS)
    with pytest.raises(XRealError, match="finite floats"):
        write_dicom(tmp_path / "x.dcm", np.full((8, 8), np.nan, np.float32), **FIELDS)
    assert not (tmp_path / "x.dcm").exists()
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    with pytest.raises(XRealError, match="unreadable DICOM"):
        read_dicom_pixels(tmp_path / "junk.dcm")


def test_monochrome1_is_read_as_monochrome2(tmp_path):
    image = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    path = write_dicom(tmp_path / "a.dcm", image, **FIELDS)
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "inverted.dcm")
    assert np.array_equal(read_dicom_pixels(tmp_path / "inverted.dcm"), 65535 - image)
