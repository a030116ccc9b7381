"""Intake survives any file: valid DICOMs of several kinds, mutated the ways exports break.

From a fixed seed, a few hundred files are cut short, have header bytes overwritten, letters
written into numeric (IS/DS/US) elements, a sequence delimiter broken, the meta group dropped or
the pixel data emptied. `fedmsk check` must never raise, and every file must be accounted for
exactly once: either used, or named by exactly one row of the report (a kept note on a used
file is that one row).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian, RLELossless
from rich.console import Console

from client.check import REPORT_NAME, check_site
from dicom_factory import make_dataset, ramp, task_config, valid_row, write_site

SEED = 20261201
N_FILES = 300


def _base(kind: str, pid: str) -> Dataset:
    """One valid dataset of the given kind."""
    if kind == "mono16":
        return make_dataset(ramp(24, 20), patient_id=pid, bits_stored=12, PixelSpacing=[0.5, 0.5])
    if kind == "mono1_window":
        return make_dataset(ramp(20, 24), patient_id=pid, photometric="MONOCHROME1", WindowCenter=2000, WindowWidth=3000)
    if kind == "rgb":
        return make_dataset(np.stack([ramp(16, 16, 255, np.uint8)] * 3, axis=-1), patient_id=pid, photometric="RGB")
    if kind == "multiframe":
        return make_dataset(np.stack([ramp(16, 16), ramp(16, 16) // 2, ramp(16, 16) // 3]), patient_id=pid,
                            ImagerPixelSpacing=[0.2, 0.2])
    if kind == "implicit":
        return make_dataset(ramp(16, 18), patient_id=pid, syntax=ImplicitVRLittleEndian, RescaleSlope=1, RescaleIntercept=0)
    if kind == "big_endian":
        return make_dataset(ramp(16, 16).byteswap(), patient_id=pid, syntax=ExplicitVRBigEndian)
    if kind == "deflated":
        return make_dataset(ramp(16, 16), patient_id=pid, syntax=DeflatedExplicitVRLittleEndian)
    if kind == "rle":
        ds = make_dataset(ramp(16, 16), patient_id=pid)
        ds.compress(RLELossless, encoding_plugin="pydicom")
        return ds
    raise AssertionError(kind)


KINDS = ("mono16", "mono1_window", "rgb", "multiframe", "implicit", "big_endian", "deflated", "rle")


def _with_sequence(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    ds.ReferencedImageSequence = [item]  # written with undefined length: item and sequence delimiters
    return ds


def _bytes(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _without_meta(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    plain = Dataset(ds)
    write_dataset(fp, plain)
    return fp.getvalue()


def _numeric_element_offsets(data: bytes) -> list[int]:
    """Value offsets of IS/DS/US elements in an explicit-VR file (found by their VR bytes)."""
    return [i + 8 for vr in (b"IS", b"DS", b"US") for i in range(132, len(data) - 8)
            if data[i + 4: i + 6] == vr and data[i:i + 2] in (b"\x28\x00", b"\x20\x00", b"\x18\x00")][:12]


def _mutate(data: bytes, ds: Dataset, rng: np.random.Generator) -> tuple[str, bytes]:
    how = rng.choice(["truncate", "overwrite", "letters", "sequence", "no_meta", "empty_pixels", "intact"],
                     p=[0.25, 0.2, 0.2, 0.1, 0.08, 0.1, 0.07])
    if how == "truncate":
        return how, data[: int(rng.integers(1, len(data)))]
    if how == "overwrite":
        buf = bytearray(data)
        start = int(rng.integers(128, min(len(data), 900)))
        width = int(rng.integers(1, 12))
        buf[start:start + width] = rng.integers(0, 256, width, dtype=np.uint8).tobytes()
        return how, bytes(buf[: len(data)])
    if how == "letters":
        offsets = _numeric_element_offsets(data)
        if not offsets:
            return "letters-none", data
        buf = bytearray(data)
        at = int(rng.choice(offsets))
        buf[at:at + 2] = rng.choice([b"XA", b"ab", b"Q1", b"1Z"])
        return how, bytes(buf)
    if how == "sequence":
        data = _bytes(_with_sequence(ds))
        at = data.find(b"\xfe\xff\xdd\xe0") if rng.random() < 0.5 else data.find(b"\xfe\xff\x0d\xe0")
        if at < 0:
            return "sequence-none", data
        buf = bytearray(data)
        buf[at:at + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        return how, bytes(buf)
    if how == "no_meta":
        return how, _without_meta(ds)
    if how == "empty_pixels":
        ds.PixelData = encapsulate([b"\x00\x00"]) if ds.file_meta.TransferSyntaxUID.is_compressed else b""
        return how, _bytes(ds)
    return how, data


@pytest.fixture(scope="module")
def fuzzed_site(tmp_path_factory):
    rng = np.random.default_rng(SEED)
    root = write_site(tmp_path_factory.mktemp("fuzz") / "site", [valid_row(f"F{n:03d}", label=n % 2) for n in range(N_FILES)])
    (root / "images").mkdir()
    made: dict[str, str] = {}
    for n in range(N_FILES):
        pid = f"F{n:03d}"
        kind = KINDS[n % len(KINDS)]
        ds = _base(kind, pid)
        how, data = ("intact", _bytes(ds)) if n < len(KINDS) else _mutate(_bytes(ds), ds, rng)
        rel = f"images/{pid}.dcm"
        (root / rel).write_bytes(data)
        made[rel] = f"{kind}/{how}"
    return root, made


@pytest.mark.parametrize(("use_cache", "manifest"), [(True, False), (False, True)], ids=["cache", "manifest"])
def test_check_never_raises_and_accounts_for_every_file_once(fuzzed_site, use_cache, manifest):
    root, made = fuzzed_site
    listing = root / "manifest.csv"
    listing.unlink(missing_ok=True)
    if manifest:  # the manifest names each file's patient: every finding about a file must name it too
        listing.write_text("patient_id,path\n" + "".join(f"{Path(f).stem},{f}\n" for f in made))
    out = io.StringIO()
    result = check_site(root, task_config(image_size=[16, 16], min_usable=5), Console(file=out, width=200),
                        use_cache=use_cache)
    with (root / REPORT_NAME).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    used = set(result.site.files)
    named: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        named.setdefault(row["file"], []).append(row)
    for rel, how in made.items():
        found = named.get(rel, [])
        assert len(found) <= 1, (rel, how, found)
        assert rel in used or len(found) == 1, (rel, how)
        if found and rel in used:
            assert found[0]["used"] == "yes", (rel, how, found)
        for row in found:
            assert row["detail"] and row["action"], (rel, how, row)
            assert row["record"] in ({Path(rel).stem} if manifest else {"", Path(rel).stem}), (rel, how, row)
    assert "Use force=True" not in (root / REPORT_NAME).read_text()
    reasons = {r["reason"] for r in rows}
    # the mutations reach the reasons they stand for, not one catch-all
    assert {"truncated", "not_dicom", "invalid_header_value", "no_meta_header"} <= reasons, reasons
    assert len(used) > N_FILES // 10  # intact and harmlessly mutated files are still used
    intact = {f for f, how in made.items() if how.endswith("/intact")}
    assert {made[f].split("/")[0] for f in intact} == set(KINDS) and intact <= used, sorted(intact - used)
