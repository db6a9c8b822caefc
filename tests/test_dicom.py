import datetime

import numpy as np
import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage

from xreal.core.errors import XRealError
from xreal.data.dicom import SYNTHETIC_NOTE, read_dicom_pixels, write_dicom

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


# --- reading real radiographs ----------------------------------------------------------

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def radiograph(path, stored, bits=12, photometric="MONOCHROME2", signed=False, **fields):
    """A DX object as a modality writes it: ``stored`` values in ``bits`` of 16 allocated."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = DX_STORAGE, uid, "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = int(signed)
    for key, value in fields.items():
        setattr(ds, key, value)
    ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


STORED = np.array([[0, 1000, 2048], [3000, 4000, 4095]], dtype=np.uint16)


def test_stored_bits_and_monochrome1_are_read_as_displayed(tmp_path):
    from xreal.data.dicom import read_dicom_image

    plain = read_dicom_image(radiograph(tmp_path / "m2.dcm", STORED, ViewPosition="PA", PixelSpacing=[0.139, 0.14]))
    np.testing.assert_allclose(plain.pixels, STORED / 4095, atol=1e-7)  # 12 bits stored: 4095 is white
    assert plain.pixel_spacing == (0.139, 0.14) and plain.view_position == "PA"
    inverted = read_dicom_image(radiograph(tmp_path / "m1.dcm", STORED, photometric="MONOCHROME1"))
    np.testing.assert_allclose(inverted.pixels, 1 - STORED / 4095, atol=1e-7)  # MONOCHROME1: 0 is white
    detector = read_dicom_image(radiograph(tmp_path / "ips.dcm", STORED, ImagerPixelSpacing=[0.2, 0.2]))
    assert detector.pixel_spacing == (0.2, 0.2) and detector.view_position is None
    signed = read_dicom_image(radiograph(tmp_path / "s.dcm", np.array([[-2048, 0, 2047]]), signed=True))
    np.testing.assert_allclose(signed.pixels, [[0.0, 2048 / 4095, 1.0]], atol=1e-7)


def test_rescale_then_window_follow_the_standards_linear_function(tmp_path):
    from xreal.data.dicom import read_dicom_image

    path = radiograph(
        tmp_path / "w.dcm", STORED, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=1000, WindowWidth=2001
    )
    modality = 2.0 * STORED - 1000  # PS3.3 C.11.1: slope and intercept first
    expected = np.clip((modality - 999.5) / 2000 + 0.5, 0, 1)  # C.11.2.1.2.1 LINEAR: c - 0.5, w - 1
    np.testing.assert_allclose(read_dicom_image(path).pixels, expected, atol=1e-6)


def test_a_voi_lut_sequence_wins_over_the_window_and_sets_the_output_depth(tmp_path):
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset

    from xreal.data.dicom import read_dicom_image

    lut = (np.arange(4096, dtype=np.uint64) ** 2 // 256).astype(np.uint16)  # a curve, 16-bit entries
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add(DataElement(0x00283006, "US", [int(v) for v in lut]))
    path = radiograph(tmp_path / "lut.dcm", STORED, VOILUTSequence=[item], WindowCenter=2048, WindowWidth=10)
    np.testing.assert_allclose(read_dicom_image(path).pixels, lut[STORED] / 65535, atol=1e-7)


def test_files_that_are_not_grayscale_images_are_named_and_do_not_stop_the_others(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from xreal.data.dicom import DicomError, read_dicom_image, read_dicom_images

    good = radiograph(tmp_path / "good.dcm", STORED)
    text = tmp_path / "notes.dcm"
    text.write_text("not a DICOM file")
    report = Dataset()
    report.file_meta = FileMetaDataset()
    report.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR: no pixels
    report.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    report.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    report.Modality = "SR"
    report.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    color = radiograph(tmp_path / "color.dcm", STORED, photometric="RGB")

    with pytest.raises(DicomError, match=r"notes\.dcm: not a readable DICOM file"):
        read_dicom_image(text)
    images, problems = read_dicom_images([good, text, tmp_path / "report.dcm", color])
    assert list(images) == [good]
    assert len(problems) == 3
    assert "report.dcm: DICOM file without pixel data (SR)" in problems[1]
    assert "color.dcm: not a grayscale image (PhotometricInterpretation RGB)" in problems[2]
