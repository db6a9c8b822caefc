"""MIMIC-CXR-JPG's three tables, in their published layout, joined into training-index rows."""

import math

import pandas as pd
import pytest

from xreal.core.labels import CHEXPERT_LABELS
from xreal.data.mimic import CHEXPERT_FILE, METADATA_FILE, SPLIT_FILE, MimicError, mimic_index
from xreal.data.training_index import TRAINING_INDEX_SCHEMA, read_training_index, write_training_index

METADATA_COLUMNS = [
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
    "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]  # fmt: skip
IMAGES = [  # dicom_id, subject, study, view, rows, columns, split
    ("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "10000032", "50414267", "PA", 3056, 2544, "train"),
    ("174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "10000032", "50414267", "LATERAL", 3056, 2544, "train"),
    ("2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "10000032", "53189527", "AP", 2544, 3056, "train"),
    ("68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714", "10000764", "57375967", "AP", 2705, 2539, "test"),
    ("ea030e7a-2e3b1346-bc518786-7a8fd698-f673b44c", "11000011", "59999999", "PA", 2022, 2022, "validate"),
]
LABELS = {  # study -> given values (blank: not mentioned)
    "50414267": {"No Finding": "1.0"},
    "53189527": {"Cardiomegaly": "1.0", "Edema": "-1.0", "Pleural Effusion": "0.0"},
    "57375967": {"Consolidation": "-1.0", "Pneumonia": "1.0"},
}  # study 59999999 has no CheXpert row


def write_tables(root, images=IMAGES, labels=LABELS, split_rows=None):
    root.mkdir(parents=True, exist_ok=True)
    procedure = {
        "PerformedProcedureStepDescription": "CHEST (PA AND LAT)",
        "StudyDate": 21800506,
        "StudyTime": 213014.531,
        "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
        "ViewCodeSequence_CodeMeaning": "postero-anterior",
        "PatientOrientationCodeSequence_CodeMeaning": "Erect",
    }
    meta = [
        {"dicom_id": d, "subject_id": s, "study_id": t, "ViewPosition": v, "Rows": r, "Columns": c, **procedure}
        for d, s, t, v, r, c, _ in images
    ]
    pd.DataFrame(meta, columns=METADATA_COLUMNS).to_csv(root / METADATA_FILE, index=False, compression="gzip")
    split = split_rows or [{"dicom_id": d, "study_id": t, "subject_id": s, "split": p} for d, s, t, *_, p in images]
    pd.DataFrame(split).to_csv(root / SPLIT_FILE, index=False, compression="gzip")
    subjects = {t: s for _, s, t, *_ in images}
    rows = [{"subject_id": subjects[t], "study_id": t, **values} for t, values in labels.items()]
    pd.DataFrame(rows, columns=["subject_id", "study_id", *CHEXPERT_LABELS]).to_csv(
        root / CHEXPERT_FILE, index=False, compression="gzip"
    )
    return root


def test_the_tables_join_into_index_rows_with_labels_as_given(tmp_path):
    table, report = mimic_index(write_tables(tmp_path / "mimic"))
    assert table.schema.equals(TRAINING_INDEX_SCHEMA, check_metadata=True)
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert len(rows) == 4 and "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962" not in rows  # lateral left out
    pa_image = rows["02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"]
    assert pa_image["image_path"] == "files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg"
    assert (pa_image["height"], pa_image["width"], pa_image["view_position"]) == (3056, 2544, "PA")
    assert (pa_image["split"], pa_image["subject_id"], pa_image["source"]) == ("train", "10000032", "mimic-cxr")
    assert pa_image["No Finding"] == 1.0 and pa_image["Cardiomegaly"] is None  # blank stays null, not 0

    ap = rows["2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab"]
    assert (ap["Cardiomegaly"], ap["Edema"], ap["Pleural Effusion"], ap["Atelectasis"]) == (1.0, -1.0, 0.0, None)
    assert rows["68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714"]["split"] == "test"
    unlabelled = rows["ea030e7a-2e3b1346-bc518786-7a8fd698-f673b44c"]
    assert unlabelled["split"] == "validate" and all(unlabelled[label] is None for label in CHEXPERT_LABELS)
    assert (report.images, report.kept, report.other_views, report.without_labels) == (5, 4, {"LATERAL": 1}, 1)
    assert "LATERAL 1" in report.to_text()

    write_training_index(table.to_pandas(), tmp_path / "index.parquet")
    back = read_training_index(tmp_path / "index.parquet")
    assert len(back) == 4 and math.isnan(back.set_index("image_id").loc[unlabelled["image_id"], "Edema"])

    everything, _ = mimic_index(tmp_path / "mimic", views=None)
    assert everything.num_rows == 5


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda root: (root / CHEXPERT_FILE).unlink(), f"{CHEXPERT_FILE}: missing; download"),
        (
            lambda root: (
                pd.read_csv(root / METADATA_FILE)
                .drop(columns="ViewPosition")
                .to_csv(root / METADATA_FILE, index=False, compression="gzip")
            ),
            "no column ViewPosition",
        ),
        (lambda root: (root / SPLIT_FILE).write_bytes(b"\x1f\x8b broken"), f"{SPLIT_FILE}: not a readable CSV table"),
    ],
)
def test_missing_or_damaged_tables_are_named(tmp_path, damage, message):
    root = write_tables(tmp_path / "mimic")
    damage(root)
    with pytest.raises(MimicError, match=message):
        mimic_index(root)


def test_values_outside_the_published_vocabularies_name_line_and_column(tmp_path):
    bad_label = {**LABELS, "57375967": {"Pneumonia": "2.0"}}
    with pytest.raises(MimicError, match=r"chexpert.csv.gz: line 4, column 'Pneumonia': 2.0 is not one of 1.0, 0.0"):
        mimic_index(write_tables(tmp_path / "a", labels=bad_label))
    with pytest.raises(MimicError, match=r"chexpert.csv.gz: not a readable CSV table .*yes"):
        mimic_index(write_tables(tmp_path / "b", labels={**LABELS, "57375967": {"Pneumonia": "yes"}}))

    split = [{"dicom_id": d, "study_id": t, "subject_id": s, "split": p} for d, s, t, *_, p in IMAGES]
    dev = [dict(r, split="dev") if i == 2 else r for i, r in enumerate(split)]
    with pytest.raises(MimicError, match=r"split.csv.gz: line 4, column 'split': 'dev' is not one of train"):
        mimic_index(write_tables(tmp_path / "c", split_rows=dev))
    with pytest.raises(MimicError, match=r"no split for 1 image\(s\), e.g. dicom_id 68b5c4b1"):
        mimic_index(write_tables(tmp_path / "d", split_rows=[r for r in split if not r["dicom_id"].startswith("68b5")]))
    with pytest.raises(MimicError, match=r"split.csv.gz: dicom_id 02aa804e-.* appears more than once \(line 2\)"):
        mimic_index(write_tables(tmp_path / "e", split_rows=[split[0], *split]))


REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows.

 IMPRESSION:

 No acute cardiopulmonary process.
"""


def test_report_text_is_the_findings_and_impression_from_the_zip_or_its_folder(tmp_path):
    import zipfile

    from xreal.data.mimic import read_reports, report_text

    expected = (
        "There is no focal consolidation, pleural effusion or pneumothorax. Bilateral nodular opacities that most"
        " likely represent nipple shadows. No acute cardiopulmonary process."
    )
    assert report_text(REPORT) == expected
    assert report_text("INDICATION: cough\nCOMPARISON: none") is None  # neither section: no text

    root = write_tables(tmp_path / "mimic")
    with zipfile.ZipFile(tmp_path / "mimic-cxr-reports.zip", "w") as archive:
        archive.writestr("files/p10/p10000032/s50414267.txt", REPORT)
        archive.writestr("files/p10/p10000032/s53189527.txt", "FINDINGS: Enlarged heart.\nIMPRESSION: Cardiomegaly.")
    table, report = mimic_index(root, reports=tmp_path / "mimic-cxr-reports.zip")
    text = dict(zip(table.column("image_id").to_pylist(), table.column("finding").to_pylist(), strict=True))
    assert text[IMAGES[0][0]] == expected and text[IMAGES[2][0]] == "Enlarged heart. Cardiomegaly."
    assert text[IMAGES[3][0]] is None and report.with_text == 2

    folder = tmp_path / "unzipped" / "files" / "p10" / "p10000032"
    folder.mkdir(parents=True)
    (folder / "s50414267.txt").write_text(REPORT)
    assert read_reports(tmp_path / "unzipped", {("10000032", "50414267")}) == {("10000032", "50414267"): expected}
    with pytest.raises(MimicError, match=r"neither mimic-cxr-reports\.zip nor the folder"):
        read_reports(tmp_path / "mimic" / METADATA_FILE, set())
