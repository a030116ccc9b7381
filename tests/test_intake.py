"""Hospital intake as exports really are: every malformed record gets its own reason, valid ones load.

Also covers manifest linking, several images per patient (task.image_select), the content-keyed
preprocessing cache, and the `fedmsk check` verb (summary, per-record report, exit status).
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

import shared.sitedata as sitedata
from cli.main import main as fedmsk
from client.check import REPORT_NAME
from dicom_factory import HEADER, make_dataset, ramp, task_config, valid_row, write_dicom, write_site
from shared.sitedata import load_site

TASK = dict(image_size=[16, 16])


def _reasons(site) -> dict[str, set[str]]:
    """reason -> the patient ids (or files, for records without a patient) it was given to."""
    out: dict[str, set[str]] = {}
    for i in site.issues:
        out.setdefault(i.reason, set()).add(i.patient_id or i.file)
    return out


@pytest.fixture(scope="module")
def messy_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy") / "hospital"
    valid = [valid_row(f"v{i}", label=i % 2) for i in range(6)]
    rows = valid + [
        valid_row("trunc"), valid_row("nopix"), valid_row("wrongid"), valid_row("zero"),
        valid_row("nan", age="NaN"),  # age: policy drop
        valid_row("blank", weight=""),  # weight: policy impute -> usable
        valid_row("garbage", bmi="abc"),
        valid_row("dup", age=70), valid_row("dup", age=71),  # conflicting duplicate
        valid_row("same", label=1), valid_row("same", label=1),  # identical duplicate -> one kept
        valid_row("unk", sex="U"),
        valid_row("badlabel", label=2),
        valid_row("nolabel").rsplit(",", 1)[0] + ",",
        valid_row("").replace(",", " ,", 1),  # no patient_id
    ]
    good = ["v0", "v1", "v2", "v3", "v4", "v5", "nan", "blank", "garbage", "dup", "same", "unk", "badlabel", "nolabel"]
    write_site(root, rows, images={pid: ramp() for pid in good})
    img = root / "images"
    full = write_dicom(img / "trunc.dcm", ramp(64, 64), patient_id="trunc").read_bytes()
    (img / "trunc.dcm").write_bytes(full[: len(full) - 3000])
    ds = make_dataset(ramp(), patient_id="nopix")
    del ds.PixelData
    ds.save_as(img / "nopix.dcm", enforce_file_format=True)
    write_dicom(img / "wrongid.dcm", ramp(), patient_id="wrong-id-typo")
    zero = make_dataset(np.zeros((0, 0), np.uint16), patient_id="zero")
    zero.save_as(img / "zero.dcm", enforce_file_format=True)
    (img / "notes.txt").write_text("exported by PACS, see ticket 1234\n")
    (img / "empty.dcm").write_bytes(b"")
    return load_site(root, task_config(**TASK))


@pytest.mark.parametrize(
    ("reason", "record"),
    [("truncated", "trunc"), ("no_pixel_data", "nopix"), ("image_without_clinical_row", "wrong-id-typo"),
     ("patient_without_image", "wrongid"), ("zero_size_image", "zero"), ("missing_required_value", "nan"),
     ("unparseable_value", "garbage"), ("duplicate_patient_conflict", "dup"), ("duplicate_patient_identical", "same"),
     ("unknown_category", "unk"), ("label_not_in_classes", "badlabel"),
     ("not_dicom", "images/notes.txt"), ("not_dicom", "images/empty.dcm"), ("missing_patient_id", "clinical.csv:22")],
)
def test_each_malformed_record_gets_its_reason(messy_site, reason, record):
    assert record in _reasons(messy_site).get(reason, set()), _reasons(messy_site)


def test_valid_records_still_load(messy_site):
    assert sorted(messy_site.patient_ids) == ["blank", "same", "v0", "v1", "v2", "v3", "v4", "v5"]
    assert messy_site.images.shape == (8, 1, 16, 16) and np.isfinite(messy_site.images).all()
    blank = messy_site.patient_ids.index("blank")
    assert np.isnan(messy_site.clinical_raw[blank, 3])  # weight_kg kept missing for the train-split imputation
    dropped = {i.patient_id for i in messy_site.issues if not i.kept}
    assert dropped.isdisjoint(messy_site.patient_ids)
    for i in messy_site.issues:
        assert i.file and i.action


@pytest.mark.parametrize(("encoding", "delimiter"), [("latin-1", ";"), ("utf-8-sig", ","), ("utf-8-sig", ";"), ("cp1252", "\t")])
def test_csv_in_another_encoding_or_delimiter(tmp_path, encoding, delimiter):
    header = HEADER.replace(",", delimiter) + f"{delimiter}comment"
    decimal = "," if delimiter != "," else "."
    rows = [delimiter.join(["p1", "71", "männlich", f"170{decimal}5", "80", f"27{decimal}7", "", "", "1", "Hüftfraktur"]),
            delimiter.join(["p2", "64", "F", "160", "55", "21.5", "20", "1.1", "0", "Rücken"])]
    root = write_site(tmp_path / "s", rows, header=header, images={"p1": ramp(), "p2": ramp()}, encoding=encoding)
    site = load_site(root, task_config(**TASK))
    assert site.patient_ids == ["p2"]
    (issue,) = site.issues
    assert issue.reason == "unknown_category" and "männlich" in issue.detail  # decoded, not mojibake
    fixed = (root / "clinical.csv").read_bytes().decode(encoding).replace("männlich", "M")
    (root / "clinical.csv").write_bytes(fixed.encode(encoding))
    site = load_site(root, task_config(**TASK))
    assert site.patient_ids == ["p1", "p2"] and site.issues == []
    assert site.clinical_raw[0, 2] == pytest.approx(170.5)  # decimal comma read where ',' is not the delimiter


def test_manifest_links_files_whose_tags_are_unusable(tmp_path):
    root = write_site(tmp_path / "s", [valid_row("p1"), valid_row("p2", label=1)])
    write_dicom(root / "images" / "a.dcm", ramp(), patient_id="ANONYMOUS")
    write_dicom(root / "images" / "b.dcm", ramp(), patient_id="")
    (root / "manifest.csv").write_text("patient_id,path\np1,images/a.dcm\np2,images/b.dcm\np2,images/gone.dcm\n")
    site = load_site(root, task_config(**TASK))
    assert site.patient_ids == ["p1", "p2"] and site.files == ["images/a.dcm", "images/b.dcm"]
    assert [(i.reason, i.patient_id) for i in site.issues] == [("manifest_file_missing", "p2")]


@pytest.fixture
def two_views(tmp_path):
    root = write_site(tmp_path / "s", [valid_row("p1"), valid_row("p2", label=1)])
    for pid in ("p1", "p2"):
        write_dicom(root / "images" / f"{pid}_lat.dcm", ramp(high=1000), patient_id=pid, SeriesDescription="LAT HIP",
                    SeriesNumber=2)
        write_dicom(root / "images" / f"{pid}_ap.dcm", ramp().T.copy(), patient_id=pid, SeriesDescription="AP PELVIS",
                    SeriesNumber=1)
    return root


@pytest.mark.parametrize(("select", "description", "files"), [
    ("first", None, ["images/p1_ap.dcm", "images/p2_ap.dcm"]),
    ("all", None, ["images/p1_ap.dcm", "images/p1_lat.dcm", "images/p2_ap.dcm", "images/p2_lat.dcm"]),
    ("series_description", "lat", ["images/p1_lat.dcm", "images/p2_lat.dcm"]),
    ("series_description", "coronal", []),
])
def test_image_select(two_views, select, description, files):
    site = load_site(two_views, task_config(image_select=select, series_description=description, **TASK))
    assert site.files == files
    assert len(site.patient_ids) == len(site.images) == len(files)
    if not files:
        assert {i.reason for i in site.issues if not i.kept} == {"no_matching_series"}


def test_cache_serves_warm_loads_and_is_invalidated_by_config_or_content(tmp_path, monkeypatch):
    root = write_site(tmp_path / "s", [valid_row(f"p{i}", label=i % 2) for i in range(4)],
                      images={f"p{i}": ramp() for i in range(4)})
    cold = load_site(root, task_config(**TASK))
    assert (root / ".fedmsk-cache").is_dir()
    decoded: list[str] = []
    real_read = sitedata.read_image
    monkeypatch.setattr(sitedata, "read_image", lambda p, **kw: decoded.append(p.name) or real_read(p, **kw))
    monkeypatch.setattr(sitedata, "read_header", lambda p: pytest.fail("header read again on a warm cache"))
    warm = load_site(root, task_config(**TASK))
    assert decoded == [] and np.array_equal(warm.images, cold.images)
    bigger = load_site(root, task_config(image_size=[24, 24]))  # preprocessing config changed
    assert sorted(decoded) == ["p0.dcm", "p1.dcm", "p2.dcm", "p3.dcm"] and bigger.images.shape[-1] == 24
    decoded.clear()
    monkeypatch.undo()
    monkeypatch.setattr(sitedata, "read_image", lambda p, **kw: decoded.append(p.name) or real_read(p, **kw))
    write_dicom(root / "images" / "p2.dcm", ramp(high=100), patient_id="p2")  # re-exported file
    again = load_site(root, task_config(**TASK))
    assert decoded == ["p2.dcm"] and np.array_equal(again.images[[0, 1, 3]], cold.images[[0, 1, 3]])


def test_unwritable_cache_folder_only_costs_speed(tmp_path):
    root = write_site(tmp_path / "s", [valid_row("p1")], images={"p1": ramp()})
    (root / ".fedmsk-cache").write_text("not a folder")  # as a read-only export would refuse the mkdir
    site = load_site(root, task_config(**TASK))
    assert site.patient_ids == ["p1"] and "no preprocessing cache" in site.cache_note


def test_check_decodes_images_the_task_does_not_select(two_views):
    full = (two_views / "images" / "p1_lat.dcm").read_bytes()
    (two_views / "images" / "p1_lat.dcm").write_bytes(full[:-200])
    task = task_config(**TASK)
    assert "truncated" not in {i.reason for i in load_site(two_views, task).issues}
    (found,) = [i for i in load_site(two_views, task, verify_all=True).issues if i.reason == "truncated"]
    assert found.kept and found.file == "images/p1_lat.dcm"


def test_check_verb_reports_and_exits_by_min_usable(messy_site, capsys):
    root = messy_site.root
    assert fedmsk(["check", str(root), "task.image_size=[16,16]", "task.min_usable=8"]) == 0
    out = capsys.readouterr().out
    assert "usable patients" in out and "truncated" in out and "Explicit VR Little Endian" in out
    with (root / REPORT_NAME).open(newline="") as fh:
        report = list(csv.DictReader(fh))
    assert {"record", "file", "reason", "action"} <= set(report[0])
    assert {r["reason"] for r in report} >= {"truncated", "not_dicom", "duplicate_patient_conflict", "unknown_category"}
    assert fedmsk(["check", str(root), "task.image_size=[16,16]", "task.min_usable=9"]) == 1
    assert "8 usable labelled patients, the task needs at least 9" in capsys.readouterr().out
    assert fedmsk(["check", str(root / "images")]) == 2


def _report(root) -> list[dict[str, str]]:
    with (root / REPORT_NAME).open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_a_letter_in_a_numeric_header_is_that_files_finding_and_the_others_go_on(tmp_path, capsys):
    root = write_site(tmp_path / "s", [valid_row(f"p{i}", label=i % 2) for i in range(4)],
                      images={f"p{i}": ramp() for i in range(3)})
    ds = make_dataset(np.stack([ramp(), ramp()]), patient_id="p3")
    ds.NumberOfFrames = "2"
    ds.save_as(root / "images" / "p3.dcm", enforce_file_format=True)
    data = (root / "images" / "p3.dcm").read_bytes()
    at = data.find(b"\x28\x00\x08\x00IS") + 8  # (0028,0008) IS: its 2-byte value
    (root / "images" / "p3.dcm").write_bytes(data[:at] + b"X2" + data[at + 2:])
    site = load_site(root, task_config(**TASK))
    assert site.patient_ids == ["p0", "p1", "p2"]
    (bad,) = [i for i in site.issues if i.file == "images/p3.dcm"]
    assert bad.reason == "invalid_header_value" and "NumberOfFrames (0028,0008) holds 'X2'" in bad.detail
    assert fedmsk(["check", str(root), "task.image_size=[16,16]", "task.min_usable=3"]) == 0
    assert [r["reason"] for r in _report(root) if r["file"] == "images/p3.dcm"] == ["invalid_header_value"]


def test_relative_site_path_with_a_manifest_lists_each_file_once(tmp_path, monkeypatch):
    root = write_site(tmp_path / "hospital" / "site", [valid_row("p1"), valid_row("p2", label=1)],
                      images={"p1": ramp(), "p2": ramp()})
    (root / "manifest.csv").write_text("patient_id,path\np1,images/p1.dcm\np2,images/p2.dcm\n")
    monkeypatch.chdir(tmp_path)
    for typed in ("hospital/site", "./hospital/../hospital/site", str(root)):
        site = load_site(typed, task_config(**TASK))
        assert site.files == ["images/p1.dcm", "images/p2.dcm"] and site.issues == [], (typed, site.issues)


def test_not_dicom_says_what_the_file_is_and_names_the_manifest_patient(tmp_path):
    root = write_site(tmp_path / "s", [valid_row("p1"), valid_row("p2", label=1)], images={"p2": ramp()})
    (root / "images" / "p1.dcm").write_bytes(b"%PDF-1.4 radiology report\n" * 20)
    (root / "manifest.csv").write_text("patient_id,path\np1,images/p1.dcm\np2,images/p2.dcm\n")
    site = load_site(root, task_config(**TASK))
    (bad,) = [i for i in site.issues if i.file == "images/p1.dcm"]
    assert bad.reason == "not_dicom" and bad.patient_id == "p1"
    assert "a PDF document" in bad.detail and "force" not in bad.detail.casefold()


def test_dicom_without_meta_header_is_read_and_said(tmp_path):
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    root = write_site(tmp_path / "s", [valid_row("p1")])
    ds = make_dataset(ramp(), patient_id="p1")
    del ds.file_meta
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)
    (root / "images").mkdir()
    (root / "images" / "p1.dcm").write_bytes(fp.getvalue())  # no preamble, no 'DICM', no group 0002
    site = load_site(root, task_config(**TASK))
    assert site.patient_ids == ["p1"]
    (note,) = site.issues
    assert note.reason == "no_meta_header" and note.kept and "Implicit VR Little Endian" in note.detail


@pytest.mark.parametrize("keep", [200, 420, 600])
def test_a_file_cut_short_in_its_header_is_truncated_not_without_pixels(tmp_path, keep):
    root = write_site(tmp_path / "s", [valid_row("p1")], images={"p1": ramp()})
    path = root / "images" / "p1.dcm"
    path.write_bytes(path.read_bytes()[:keep])
    (found,) = [i for i in load_site(root, task_config(**TASK)).issues if i.file == "images/p1.dcm"]
    assert found.reason == "truncated", found


def test_details_are_never_cut_mid_word():
    from shared.dicom import clip

    text = "the decoder said: " + " ".join(["pneumatisation"] * 40)
    out = clip(text, 100)
    assert len(out) <= 100 and out.endswith("…") and out[:-1].split()[-1] in ("pneumatisation", "said")


def _xlsx_bytes() -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:  # the container of an .xlsx: a ZIP with the workbook's XML parts
        z.writestr("[Content_Types].xml", "<Types/>")
        z.writestr("xl/workbook.xml", "<workbook/>")
    return buf.getvalue()


@pytest.mark.parametrize(("content", "cause"), [
    (b"", "clinical.csv is empty"),
    ((HEADER + "\n").encode(), "has a header but no patient rows"),
    (bytes(range(256)) * 8, "clinical.csv is binary data"),
    (_xlsx_bytes(), "clinical.csv is an Excel workbook (.xlsx"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(500), "clinical.csv is an Excel 97-2003 workbook (.xls)"),
    ((HEADER.replace(",age", ",age_years") + "\n" + valid_row("p1") + "\n").encode(), "has no column 'age'"),
    ((HEADER.replace(",sarcopenia", ",outcome") + "\n" + valid_row("p1") + "\n").encode(), "has no label column 'sarcopenia'"),
], ids=["empty", "header_only", "binary", "xlsx", "xls", "no_age_column", "no_label_column"])
def test_an_unusable_clinical_table_is_named_first_not_as_every_image_unlinked(tmp_path, capsys, content, cause):
    root = write_site(tmp_path / "s", [], images={f"p{i}": ramp() for i in range(3)})
    (root / "clinical.csv").write_bytes(content)
    assert fedmsk(["check", str(root), "task.image_size=[16,16]", "task.min_usable=1"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("clinical table unusable: ") and out.index(cause) < out.index("usable patients"), out
    assert cause in out.rsplit("NOT READY", 1)[1], out  # and the verdict names it
    assert "image_without_clinical_row" not in out and "not in clinical.csv" not in (root / REPORT_NAME).read_text()


def test_missing_values_are_counted_per_column_by_spelling(tmp_path, capsys):
    rows = [valid_row("p1", weight="N/A"), valid_row("p2", label=1, weight="null"), valid_row("p3", weight=""),
            valid_row("p4", label=1, age="nan"), valid_row("p5", weight="NA")]
    root = write_site(tmp_path / "s", rows, images={f"p{i}": ramp() for i in range(1, 6)})
    site = load_site(root, task_config(**TASK))
    assert site.clinical_missing == {"weight_kg": {"N/A": 1, "null": 1, "empty": 1, "NA": 1}, "age": {"nan": 1}}
    (dropped,) = [i for i in site.issues if i.reason == "missing_required_value"]
    assert dropped.patient_id == "p4" and "age is missing (written 'nan')" in dropped.detail
    fedmsk(["check", str(root), "task.image_size=[16,16]", "task.min_usable=1"])
    out = " ".join(capsys.readouterr().out.split())
    assert "weight_kg 4 (" in out and "imputed" in out and "age 1 (nan 1; patients left out)" in out


def test_exit_codes_tell_not_ready_from_usage_and_internal_errors(tmp_path, capsys, monkeypatch):
    import client.check

    root = write_site(tmp_path / "s", [valid_row("p1"), valid_row("p2", label=1)], images={"p1": ramp(), "p2": ramp()})
    args = ["check", str(root), "task.image_size=[16,16]"]
    assert fedmsk([*args, "task.min_usable=2"]) == 0
    assert fedmsk([*args, "task.min_usable=3"]) == 1  # not ready
    assert fedmsk([*args, "task.min_usabel=2"]) == 2  # config error
    assert fedmsk(["check", str(tmp_path / "nowhere")]) == 2  # not a site folder
    capsys.readouterr()
    monkeypatch.setenv("FEDMSK_CRASH_DIR", str(tmp_path / "crash"))
    monkeypatch.setattr(client.check, "load_site", lambda *a, **k: {}["bug"])
    assert fedmsk(args) == 3
    err = " ".join(capsys.readouterr().err.split())
    assert "internal error in fedmsk check: KeyError: 'bug'" in err and "Traceback" not in err
    (crash,) = (tmp_path / "crash").iterdir()
    assert str(crash) in err and "Traceback (most recent call last)" in crash.read_text()
