"""Tiny DICOM files and site folders written on the fly for the loading tests.

Kept apart from simulation/synth.py on purpose: these tests pin down decoding semantics with
hand-chosen pixel values and tags, independent of how synthetic hospitals are generated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, UID, generate_uid

from shared.config import CONFIG_DIR, TaskConfig


def task_config(**overrides: Any) -> TaskConfig:
    """The real configs/task/sarcopenia.yaml as a TaskConfig, with overrides (e.g. image_size=[16, 16])."""
    merged = OmegaConf.merge(OmegaConf.structured(TaskConfig), OmegaConf.load(CONFIG_DIR / "task" / "sarcopenia.yaml"),
                             overrides)
    task = OmegaConf.to_object(merged)
    assert isinstance(task, TaskConfig)
    return task


def make_dataset(pixels: np.ndarray, patient_id: str = "P1", photometric: str = "MONOCHROME2",
                 bits_stored: int | None = None, signed: bool = False, syntax: UID = ExplicitVRLittleEndian,
                 **tags: Any) -> Dataset:
    """A minimal valid image dataset holding ``pixels`` ([rows, cols], [frames, rows, cols] or [..., 3])."""
    arr = np.asarray(pixels)
    color = arr.ndim >= 3 and arr.shape[-1] == 3 and photometric in ("RGB", "YBR_FULL")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.Modality = tags.pop("Modality", "DX")
    ds.SeriesInstanceUID = tags.pop("SeriesInstanceUID", generate_uid())
    ds.StudyInstanceUID = generate_uid()
    spatial = arr.shape[:-1] if color else arr.shape
    if len(spatial) == 3:
        ds.NumberOfFrames = spatial[0]
    ds.Rows, ds.Columns = spatial[-2], spatial[-1]
    ds.SamplesPerPixel = 3 if color else 1
    if color:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    bits_alloc = arr.dtype.itemsize * 8
    ds.BitsAllocated = bits_alloc
    ds.BitsStored = bits_stored or bits_alloc
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = arr.tobytes()
    return ds


def write_dicom(path: Path, pixels: np.ndarray, **kwargs: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = make_dataset(pixels, **kwargs)
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(rows: int = 24, cols: int = 20, high: int = 4000, dtype: type = np.uint16) -> np.ndarray:
    """A gradient with a bright square: asymmetric, so flips and transposes are caught."""
    y, x = np.mgrid[0:rows, 0:cols]
    img = (x * 7 + y * 3).astype(np.float64)
    img[rows // 4: rows // 2, cols // 5: cols // 2] += 60
    img = img / img.max() * high
    return img.astype(dtype)


HEADER = "patient_id,age,sex,height_cm,weight_kg,bmi,grip_strength_kg,gait_speed_m_s,sarcopenia"


def write_site(root: Path, rows: list[str], header: str = HEADER, images: dict[str, np.ndarray] | None = None,
               encoding: str = "utf-8") -> Path:
    """A site folder: clinical.csv from ``rows`` and one DICOM per patient id in ``images``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "clinical.csv").write_bytes(("\n".join([header, *rows]) + "\n").encode(encoding))
    for pid, pixels in (images or {}).items():
        write_dicom(root / "images" / f"{pid}.dcm", pixels, patient_id=pid)
    return root


def valid_row(pid: str, label: int = 0, age: float = 70, sex: str = "F", height: str = "165", weight: str = "70",
              bmi: str = "25.7", grip: str = "28", gait: str = "1.0") -> str:
    return f"{pid},{age},{sex},{height},{weight},{bmi},{grip},{gait},{label}"
