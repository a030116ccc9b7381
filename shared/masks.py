"""Optional per-patient segmentation masks in the site contract: ``<site>/masks/<patient_id>.<ext>``.

A hospital that has outlined bones on some radiographs (radius, ulna, metacarpals for the hand
task) puts one mask per patient into ``masks/``, named by the patient_id of clinical.csv:

- ``.png``: a label image (8- or 16-bit grey), 0 = background, 1..K in the order of
  ``task.mask_labels``;
- ``.npy``: the same label map as a 2D integer array (``numpy.save``);
- ``.dcm``: a DICOM Segmentation (SEG, binary or fractional frames), read with pydicom: each
  segment's ``SegmentLabel`` names one of ``task.mask_labels`` (case-insensitive), and the
  per-frame ``ReferencedSegmentNumber`` says which segment a frame holds. highdicom would read it
  too but is not a dependency; pydicom and these few tags are all a SEG label map needs.

The mask annotates the image the task selects for that patient, at that DICOM's matrix (Rows x
Columns). It goes through the image's own geometric preprocessing (``shared.transforms.preprocess``:
the same resampling and crop) as K+1 one-hot channels, so it stays aligned with the pixels, and
it is appended to the image as extra input channels: the training augmentation then moves image
and mask together. A patient without a usable mask gets all-zero channels, which the
segmentation loss reads as "not annotated" (its term is zero). Masks are optional: every problem
with one is a kept finding (the patient trains without a mask), never a reason to drop the patient.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from shared.config import ConfigError, FedmskConfig, TaskConfig, register_check
from shared.dicom import clip
from shared.records import RecordIssue, issue
from shared.transforms import preprocess

MASK_DIR = "masks"
SUFFIXES = (".png", ".npy", ".dcm")
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COUNTS = ("files", "found", "missing", "unreadable", "shape_mismatch", "bad_labels")


class MaskError(Exception):
    """A mask file that cannot be used: ``reason`` (shared.records) and a detail naming what is wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def mask_channels(task: TaskConfig) -> int:
    """Extra input channels a task's masks add (one-hot incl. background), 0 without masks."""
    return len(task.mask_labels) + 1 if task.mask_labels else 0


def read_label_map(path: Path, labels: list[str]) -> np.ndarray:
    """A mask file -> int64 label map [rows, cols] with values 0..len(labels); MaskError otherwise."""
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif path.suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im)
        else:
            arr = _read_seg(path, labels)
    except MaskError:
        raise
    except Exception as exc:  # noqa: BLE001 -- any reader failure is this file's finding
        raise MaskError("mask_unreadable", f"{type(exc).__name__}: {clip(str(exc))}") from None
    if arr.ndim != 2:
        raise MaskError("mask_unreadable", f"a label map has 2 dimensions, this one has shape {list(arr.shape)}")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise MaskError("mask_bad_labels", f"label values must be integers, found {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = sorted(set(np.unique(arr).tolist()) - set(range(len(labels) + 1)))
    if bad:
        raise MaskError("mask_bad_labels", f"values {bad[:5]} outside 0..{len(labels)} ({', '.join(labels)})")
    return arr


def _read_seg(path: Path, labels: list[str]) -> np.ndarray:
    """DICOM SEG -> label map: frame i belongs to its ReferencedSegmentNumber; the segment's
    SegmentLabel gives the label value (later task labels win where segments overlap)."""
    import pydicom

    ds = pydicom.dcmread(path)
    if str(getattr(ds, "SOPClassUID", "")) != SEG_STORAGE:
        raise MaskError("mask_unreadable", f"not a DICOM Segmentation (SOPClassUID {getattr(ds, 'SOPClassUID', 'missing')})")
    wanted = {name.casefold(): k for k, name in enumerate(labels, start=1)}
    value_of: dict[int, int] = {}
    for seg in ds.SegmentSequence:
        name = str(seg.SegmentLabel).casefold()
        if name not in wanted:
            raise MaskError("mask_bad_labels", f"segment '{seg.SegmentLabel}' is none of task.mask_labels {labels}")
        value_of[int(seg.SegmentNumber)] = wanted[name]
    frames = ds.pixel_array
    frames = frames[None] if frames.ndim == 2 else frames
    out = np.zeros(frames.shape[1:], np.int64)
    per_frame = ds.PerFrameFunctionalGroupsSequence
    order = sorted(range(len(frames)), key=lambda i: value_of.get(_segment_number(per_frame[i]), 0))
    for i in order:
        number = _segment_number(per_frame[i])
        if number not in value_of:
            raise MaskError("mask_unreadable", f"frame {i + 1} references segment {number}, not in SegmentSequence")
        out[frames[i] > 0] = value_of[number]
    return out


def _segment_number(frame: Any) -> int:
    return int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)


class SiteMasks:
    """One site's masks/ folder during one ``load_site``: which patient has which mask, counts and findings."""

    def __init__(self, root: Path, task: TaskConfig) -> None:
        self.task = task
        self.folder = root / MASK_DIR
        self.present = self.folder.is_dir()
        self.counts: Counter[str] = Counter({k: 0 for k in COUNTS})
        self.issues: list[RecordIssue] = []
        by_id: dict[str, list[Path]] = defaultdict(list)
        if self.present:
            for p in sorted(self.folder.iterdir()):
                if p.is_file() and p.suffix.lower() in SUFFIXES and not p.name.startswith("."):
                    by_id[p.stem].append(p)
        self.files: dict[str, Path] = {}
        self.counts["files"] = sum(len(paths) for paths in by_id.values())
        for pid, paths in by_id.items():
            self.files[pid] = paths[0]
            if len(paths) > 1:
                self.issues.append(issue("mask_duplicate", pid, self._rel(paths[0]),
                                         f"also {', '.join(p.name for p in paths[1:])}; using {paths[0].name}", kept=True))

    def _rel(self, path: Path) -> str:
        return f"{MASK_DIR}/{path.name}"

    def channels(self, patient_id: str, header: dict[str, Any]) -> np.ndarray:
        """[K+1, *task.image_size] one-hot mask of this patient's selected image, zeros without a usable one."""
        task = self.task
        zeros = np.zeros((mask_channels(task), *task.image_size), np.float32)
        path = self.files.get(patient_id)
        if path is None:
            if self.present:
                self.counts["missing"] += 1
                self.issues.append(issue("mask_missing", patient_id, f"{MASK_DIR}/{patient_id}.png",
                                         "no mask for this patient in masks/", kept=True))
            return zeros
        rel = self._rel(path)
        try:
            labels = read_label_map(path, task.mask_labels)
            shape = (int(header["rows"]), int(header["columns"]))
            if labels.shape != shape:
                raise MaskError("mask_shape_mismatch", f"mask is {labels.shape[0]}x{labels.shape[1]}, the image it "
                                                       f"annotates is {shape[0]}x{shape[1]} (rows x columns)")
            spacing = header.get("spacing_mm")
            onehot = labels[None] == np.arange(mask_channels(task))[:, None, None]
            out = np.concatenate([preprocess(ch.astype(np.float32), spacing, task) for ch in onehot]).astype(np.float32)
        except MaskError as exc:
            key = {"mask_unreadable": "unreadable", "mask_shape_mismatch": "shape_mismatch"}.get(exc.reason, "bad_labels")
            self.counts[key] += 1
            self.issues.append(issue(exc.reason, patient_id, rel, exc.detail + "; the patient trains without a mask",
                                     kept=True))
            return zeros
        self.counts["found"] += 1
        return out

    def finish(self, patients: set[str]) -> list[RecordIssue]:
        """The findings, plus every mask named after no clinical.csv patient."""
        orphans = [issue("mask_without_patient", pid, self._rel(p), f"no clinical.csv row with patient_id '{pid}'", kept=True)
                   for pid, p in sorted(self.files.items()) if pid not in patients]
        return self.issues + orphans


def mask_line(counts: dict[str, int]) -> str:
    """The `fedmsk check` summary line for a site's masks/ folder."""
    if not counts.get("files"):
        return "none in masks/ (optional: the segmentation trains at the sites that have masks)"
    problems = ", ".join(f"{k.replace('_', ' ')} {counts[k]}" for k in COUNTS[3:] if counts.get(k))
    return (f"{counts['found']} patients with a usable mask of {counts['files']} files"
            + (f"; {problems} (used without a mask; see the report)" if problems else "")
            + (f"; {counts['missing']} patients without a mask" if counts.get("missing") else ""))


@register_check
def _check_mask_task(cfg: FedmskConfig) -> None:
    """Masks annotate one 2D image per patient: refuse the combinations where that is not defined."""
    task = cfg.task
    if not task.mask_labels:
        return
    if task.spatial_dims != 2:
        raise ConfigError(f"config 'task.mask_labels' is set for a {task.spatial_dims}D task; masks are read for 2D "
                          f"radiograph tasks only (set task.mask_labels=[])")
    if task.image_select == "all":
        raise ConfigError("config 'task.mask_labels' with 'task.image_select=all': a mask is named by patient and "
                          "annotates one image; use image_select=first or series_description")
    if len(set(n.casefold() for n in task.mask_labels)) != len(task.mask_labels):
        raise ConfigError(f"config 'task.mask_labels' {task.mask_labels} repeats a label")
