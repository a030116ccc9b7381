"""Synthetic hand radiographs for osteoporosis screening (`fedmsk synth task=osteoporosis_hand`).

The seed (Hwang, Lee, Yoon 2025) screens osteoporosis from hand X-rays, motivated by the
second metacarpal's cortical index (2MCI: combined cortical thickness / outer diameter of the
2nd metacarpal shaft), a peripheral marker of bone loss. The generator draws PA hand/wrist
radiographs in which the 2MCI carries a latent DXA T-score, writes them as DICOM through the
sarcopenia generator's scanner and DICOM code (``simulation.synth``: site palette, scanners,
``acquire``, ``dicom_dataset``, ``publish_federation``) and its projection primitives
(``simulation.anatomy``: capsules with a cortical shell), and writes bone masks (radius 1,
ulna 2, metacarpals 3) for a subset of sites, as a hospital that annotated some images would.

Latent model (also in ``<data_root>/README.txt``):

- T = 0.3 - c * (0.045 (age - 60) + 0.6 [female]) + i * 0.9 u,  u ~ N(0, 1) an individual
  term the image shows and the table does not (c = synth.clinical_signal, i = synth.image_signal);
- image: 2MCI = 0.50 + 0.08 T + N(0, 0.015) (clipped 0.15..0.8) sets the cortex of the 2nd and
  3rd metacarpals; the other metacarpals, radius and ulna follow T more noisily (N(0, 0.05)),
  and the mineral density (brightness) of every bone is 1 + 0.15 T + N(0, 0.08); bone size follows sex;
  positioning (shift, rotation, zoom) jitters;
- label: osteoporosis = 1[T + e <= t_site], e ~ N(0, 0.5) (DXA vs hand-cortex disagreement),
  t_site the quantile giving the site's prevalence; oracle.csv holds -T (the best score).

Masks: even-numbered sites (site_a, site_c, ...) annotate about 70 % of their patients, site_a
as label PNGs, site_c as DICOM SEG, the others as .npy; each masked site also holds one mask at
half the image's matrix and one unreadable mask file (what `fedmsk check` reports), and a mask
for the image without a clinical row.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pack_bits
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from shared.config import FedmskConfig
from shared.masks import MASK_DIR, SEG_STORAGE
from simulation.anatomy import _bone, _chord, _segment_distance
from simulation.synth import (REFERENCE_SPACING_MM, SiteSpec, acquire, dicom_dataset, oracle_row, publish_federation,
                              site_specs)

REF = 128.0
MASK_SHARE = 0.7
LABEL_NOISE = 0.5
LABELS = ("radius", "ulna", "metacarpals")
# metacarpals 1 (thumb) .. 5: base, head (reference px), shaft radius
_METACARPALS = [((44.0, 86.0), (26.0, 60.0), 5.0), ((52.0, 84.0), (46.0, 40.0), 5.6), ((64.0, 83.0), (64.0, 38.0), 5.3),
                ((76.0, 84.0), (80.0, 41.0), 4.6), ((87.0, 87.0), (96.0, 50.0), 4.3)]


def mask_format(index: int) -> str | None:
    """How site ``index`` stores masks: even sites annotate (png, seg, npy in turn); odd ones none."""
    return None if index % 2 else ("png", "seg", "npy")[(index // 2) % 3]


def t_score(age: np.ndarray, female: np.ndarray, u: np.ndarray, clinical_signal: float, image_signal: float) -> np.ndarray:
    return 0.3 - clinical_signal * (0.045 * (age - 60.0) + 0.6 * female) + image_signal * 0.9 * u


def render_hand(t: float, female: bool, rng: np.random.Generator, size: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(ideal projection [size, size] in [0, 1], label map: 0 background, 1 radius, 2 ulna, 3 metacarpals)."""
    k = REF / size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = REF / 2.0
    u, v = (xx + 0.5) * k - c, (yy + 0.5) * k - c
    ang = math.radians(rng.normal(0.0, 2.5))
    z = scale * rng.normal(1.0, 0.03)
    x = (math.cos(ang) * u + math.sin(ang) * v) / z + c - rng.normal(0.0, 2.0)
    y = (-math.sin(ang) * u + math.cos(ang) * v) / z + c - rng.normal(0.0, 2.0)
    b = (0.94 if female else 1.06) * rng.normal(1.0, 0.03)
    density = float(np.clip(1.0 + 0.15 * t + rng.normal(0, 0.08), 0.4, 1.5))
    mci = float(np.clip(0.50 + 0.08 * t + rng.normal(0, 0.015), 0.15, 0.8))
    labels = np.zeros(x.shape, np.int64)

    # soft tissue: forearm, palm, fingers
    att = 0.012 * _chord(26.0 * b, _segment_distance(x, y, (66.0, 100.0), (66.0, 160.0)))
    att = np.maximum(att, 0.012 * _chord(30.0 * b, _segment_distance(x, y, (64.0, 80.0), (64.0, 52.0))))
    for (base, head, r) in _METACARPALS:
        tip = (head[0] + 0.9 * (head[0] - base[0]), head[1] + 0.9 * (head[1] - base[1]))
        att = np.maximum(att, 0.012 * _chord(2.1 * r * b, _segment_distance(x, y, head, tip)))
    # radius and ulna (cortex follows T noisily), carpals (trabecular), metacarpals (2MCI), phalanges
    for label, p0, p1, r in ((1, (52.0, 170.0), (50.0, 100.0), 8.0), (2, (82.0, 170.0), (80.0, 103.0), 5.5)):
        dist = np.minimum(_segment_distance(x, y, p0, p1), np.hypot(x - p1[0], y - p1[1]) * (0.8 if label == 1 else 0.95))
        cortex = r * b * float(np.clip(mci * 0.7 + rng.normal(0, 0.05), 0.1, 0.6))
        att = att + _bone(dist, r * b, cortex, density)
        labels[dist < r * b] = label
    for cx, cy, r in ((50, 92, 5.0), (60, 93, 5.0), (70, 92, 4.5), (79, 94, 4.0), (48, 86, 4.5), (58, 86, 4.5), (68, 86, 4.5), (78, 87, 4.0)):
        att = att + _bone(np.hypot(x - cx, y - cy), r * b, 0.8, 0.8 * density)
    for n, (base, head, r) in enumerate(_METACARPALS, start=1):
        dist = _segment_distance(x, y, base, head)
        shell = mci if n in (2, 3) else float(np.clip(mci + rng.normal(0, 0.05), 0.15, 0.8))
        att = att + _bone(dist, r * b, r * b * shell, density)
        labels[dist < r * b] = 3
        tip = (head[0] + 0.55 * (head[0] - base[0]), head[1] + 0.55 * (head[1] - base[1]))
        att = att + _bone(_segment_distance(x, y, (head[0] + 0.08 * (tip[0] - head[0]), head[1] + 0.08 * (tip[1] - head[1])), tip),
                          0.75 * r * b, 0.3 * r * b, density)
    return np.clip(att / 2.2, 0.0, 1.0).astype(np.float32), labels


def seg_dataset(labels: np.ndarray, image: Dataset) -> Dataset:
    """A minimal binary DICOM Segmentation of ``labels`` referencing ``image``: one frame per segment."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SEG_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[image.SOPInstanceUID, "seg"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SEG_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.Modality = "SEG"
    ds.PatientID, ds.StudyInstanceUID = image.PatientID, image.StudyInstanceUID
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[image.SOPInstanceUID, "seg-series"])
    ds.SegmentationType = "BINARY"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = labels.shape
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit, ds.PixelRepresentation = 0, 0
    ds.NumberOfFrames = len(LABELS)
    ds.SegmentSequence = Sequence()
    ds.PerFrameFunctionalGroupsSequence = Sequence()
    for number, name in enumerate(LABELS, start=1):
        seg = Dataset()
        seg.SegmentNumber, seg.SegmentLabel, seg.SegmentAlgorithmType = number, name, "MANUAL"
        ds.SegmentSequence.append(seg)
        frame, ident = Dataset(), Dataset()
        ident.ReferencedSegmentNumber = number
        frame.SegmentIdentificationSequence = Sequence([ident])
        ds.PerFrameFunctionalGroupsSequence.append(frame)
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = image.SOPClassUID, image.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID, series.ReferencedInstanceSequence = image.SeriesInstanceUID, Sequence([ref])
    ds.ReferencedSeriesSequence = Sequence([series])
    ds.PixelData = pack_bits(np.stack([labels == n for n in range(1, len(LABELS) + 1)]).astype(np.uint8))
    return ds


def _write_mask(folder: Path, pid: str, labels: np.ndarray, fmt: str, image: Dataset) -> None:
    if fmt == "png":
        from PIL import Image

        Image.fromarray(labels.astype(np.uint8)).save(folder / f"{pid}.png")
    elif fmt == "npy":
        np.save(folder / f"{pid}.npy", labels.astype(np.uint8))
    else:
        seg_dataset(labels, image).save_as(folder / f"{pid}.dcm", enforce_file_format=True)


def _write_site(root: Path, spec: SiteSpec, cfg: FedmskConfig, advance: Callable[[], None]) -> list[tuple[str, str, float, int]]:
    """One site folder (clinical.csv, images/, masks/ at annotating sites); returns its oracle rows."""
    rng = np.random.default_rng([cfg.seed, spec.index, 11])
    n = spec.patients
    female = rng.random(n + 1) < 0.65
    age = np.clip(rng.normal(66.0 + spec.age_shift, 9.0, n + 1), 45.0, 95.0).round()
    hidden = rng.normal(0.0, 1.0, n + 1)
    t = t_score(age, female.astype(float), hidden, cfg.synth.clinical_signal, cfg.synth.image_signal)
    measured = t + rng.normal(0.0, LABEL_NOISE, n + 1)
    label = (measured <= np.quantile(measured[:n], spec.prevalence)).astype(np.int64)
    ids = [f"{spec.name.removeprefix('site_').upper()}{k}" for k in rng.choice(np.arange(100000, 999999), n + 1, replace=False)]
    bad_age, no_image, small_mask, broken_mask = (int(k) for k in rng.choice(n, size=4, replace=False))
    orphan = n

    site_dir = root / spec.name
    (site_dir / "images").mkdir(parents=True)
    fmt = mask_format(spec.index)
    masks = site_dir / MASK_DIR
    if fmt:
        masks.mkdir()
    annotated = rng.random(n + 1) < MASK_SHARE
    annotated[[small_mask, broken_mask, orphan]] = True
    male_s, female_s = spec.sex_spelling
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["patient_id", "age", "sex", cfg.task.label_column])
    missing_age = rng.random(n) < spec.missing_rate / 2.0
    for i in range(n):
        shown_age = "150" if i == bad_age else ("" if missing_age[i] else f"{age[i]:.0f}")
        w.writerow([ids[i], shown_age, female_s if female[i] else male_s, int(label[i])])
    (site_dir / "clinical.csv").write_text(buf.getvalue())

    sc = spec.scanner
    size = cfg.synth.image_size
    for i in range(n + 1):
        if i == no_image:
            advance()
            continue
        img_rng = np.random.default_rng([cfg.seed, spec.index, 12, i])
        ideal, labels = render_hand(float(t[i]), bool(female[i]), img_rng, size, REFERENCE_SPACING_MM / sc.spacing_mm)
        ent = [str(cfg.seed), spec.name, ids[i], "hand"]
        uids = tuple(generate_uid(entropy_srcs=[*ent, part]) for part in ("study", "series", "instance"))
        ds = dicom_dataset(acquire(ideal, sc, img_rng), sc, ids[i], "F" if female[i] else "M", uids, "20240115")
        ds.BodyPartExamined, ds.ViewPosition, ds.SeriesDescription = "HAND", "PA", "HAND PA"
        ds.save_as(site_dir / "images" / f"IM{i + 1:05d}.dcm", enforce_file_format=True)
        if fmt and annotated[i]:
            if i == small_mask:
                labels = labels[::2, ::2]
            _write_mask(masks, ids[i], labels, fmt, ds)
            if i == broken_mask:
                next(masks.glob(f"{ids[i]}.*")).write_bytes(b"not a mask")
        advance()
    return [(spec.name, ids[i], float(-t[i]), int(label[i])) for i in range(n)]


def _readme(cfg: FedmskConfig, specs: list[SiteSpec]) -> str:
    lines = [
        "fedmsk synthetic hand radiographs for osteoporosis (written by `fedmsk synth task=osteoporosis_hand`)",
        f"seed={cfg.seed} num_sites={cfg.num_sites} image_size={cfg.synth.image_size}",
        "",
        "Layout: <site>/clinical.csv (patient_id,age,sex,osteoporosis), <site>/images/IM*.dcm (PatientID links),",
        "<site>/masks/<patient_id>.png|.dcm|.npy at annotating sites (0 background, 1 radius, 2 ulna, 3 metacarpals);",
        "oracle.csv (site,patient_id,latent_score=-T,label) is never read by training.",
        "",
        __doc__.split("Latent model (also in ``<data_root>/README.txt``):", 1)[1].split("Masks:", 1)[0].strip(),
        "",
        "Deliberately unusable records: an age of 150, a patient without an image, an image without a",
        "clinical row (whose mask is then an orphan); at annotating sites one mask at half the image's",
        "matrix and one unreadable mask file.",
        "",
        "Sites:",
    ]
    for sp in specs:
        sc = sp.scanner
        lines.append(f"  {sp.name}: {sp.patients} patients, prevalence {sp.prevalence:.2f}, masks "
                     f"{mask_format(sp.index) or 'none'}, {sc.modality} {sc.photometric} {sc.bits_stored}-bit, "
                     f"{sc.spacing_mm} mm, sex written {sp.sex_spelling[0]}/{sp.sex_spelling[1]}")
    return "\n".join(lines) + "\n"


def total_steps(cfg: FedmskConfig) -> int:
    return sum(sp.patients + 1 for sp in site_specs(cfg))


def describe(cfg: FedmskConfig) -> tuple[list[str], list[list[str]]]:
    rows = [[sp.name, str(sp.patients), f"{sp.prevalence:.2f}", mask_format(sp.index) or "-",
             f"{sp.scanner.modality} {sp.scanner.photometric} {sp.scanner.bits_stored}-bit"] for sp in site_specs(cfg)]
    return ["site", "patients", "prevalence", "masks", "scanner"], rows


def write_federation(cfg: FedmskConfig, advance: Callable[[], None] | None = None) -> Path:
    """cfg.num_sites hand-radiograph sites + oracle.csv + README.txt under cfg.data_root (deterministic in cfg.seed)."""
    specs = site_specs(cfg)
    step = advance or (lambda: None)
    return publish_federation(Path(cfg.data_root), specs,
                              lambda tmp, spec: [oracle_row(*r) for r in _write_site(tmp, spec, cfg, step)],
                              lambda: _readme(cfg, specs), f"hand radiographs, seed {cfg.seed}")
