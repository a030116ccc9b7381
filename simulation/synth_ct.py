"""Synthetic CT hospitals for vertebral fracture screening: `fedmsk synth task=vertebral_fracture`.

Each patient has one CT series of a short spine segment (three stacked vertebral bodies with
their posterior arches, inside a body outline of fat and soft tissue), written as a hospital's
PACS exports it: one CT Image Storage file per slice (shuffled file names, geometry only in
ImagePositionPatient / ImageOrientationPatient / SliceThickness / PixelSpacing, stored values
turned into HU by RescaleSlope/Intercept), or, at the site whose scanner says so, one Enhanced
CT file whose frames carry their positions in per-frame functional groups.

Ground truth (written to ``<data_root>/oracle.csv``, outside the site folders):

- Fracture risk rises with age and is higher in women; the site's prevalence fixes how many
  patients have a fracture (grade >= 1). A fractured patient's grade is mild, moderate or severe
  with probabilities ``GRADE_MIX``; one of the three vertebrae is fractured with a true height
  loss drawn inside the grade's Genant band (20-25 %, 25-40 %, 40-55 %) and a deformity type:
  wedge (anterior height reduced), biconcave (middle) or crush (posterior). Every vertebra also
  has a natural deformity of 0-10 %, so a mild fracture (20 %) is faint against normal variation.
- The label is the grade a radiologist reads from the *measured* height loss (true loss plus
  reading noise ``READ_NOISE``), so the oracle, which grades the true loss, is good but not
  perfect. Bone density (trabecular HU) falls with age and is lower in women.

Scanners differ in slice spacing and thickness (partial-volume averaging over the slice),
pixel spacing (field of view), reconstruction kernel (smoothing and noise), signed or unsigned
storage and rescale, and export format. Each site also holds deliberately unusable records: an
age of 150, a patient without a series, a series without a clinical row, and a series with a
missing slice (a gap in the positions).
"""

from __future__ import annotations

import csv
import io
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy.ndimage import gaussian_filter

from shared.config import ConfigError, FedmskConfig
from simulation.synth import publish_federation, site_name, site_settings

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
GENANT_BOUNDS = (0.20, 0.25, 0.40)  # height-loss fractions where grades 1, 2, 3 start
GRADE_BANDS = {1: (0.20, 0.25), 2: (0.25, 0.40), 3: (0.40, 0.55)}
GRADE_MIX = (0.40, 0.35, 0.25)  # mild, moderate, severe among fractured patients
NORMAL_DEFORMITY = 0.10  # natural height variation of an intact vertebra (uniform 0..this)
READ_NOISE = 0.015  # SD of the radiologist's height-loss reading
N_VERTEBRAE = 3
BODY_HEIGHT_MM = 20.0
DISC_MM = 6.0
DEFORMITIES = ("wedge", "biconcave", "crush")  # anterior, middle, posterior height loss
Z_SUBSAMPLES = 3  # partial-volume samples across one slice thickness


@dataclass(frozen=True)
class CTScanner:
    """One site's CT: acquisition geometry, reconstruction kernel, storage and export format."""

    model: str
    slice_mm: float
    thickness_mm: float
    pixel_mm: float
    kernel: str
    blur_px: float  # in-plane Gaussian of the reconstruction kernel
    noise_hu: float
    signed: bool
    slope: float
    intercept: float
    enhanced: bool  # one Enhanced CT file per series instead of one file per slice
    head_first: bool  # slice positions exported from head to feet


_SCANNERS = [
    CTScanner("SYNTH CT 64", 2.0, 2.0, 1.40, "B30f", 0.8, 14.0, False, 1.0, -1024.0, False, False),
    CTScanner("SYNTH CT 16", 3.0, 3.0, 1.60, "BONE", 0.0, 30.0, True, 1.0, 0.0, False, True),
    CTScanner("SYNTH CT 128", 2.5, 2.5, 1.25, "STANDARD", 0.4, 20.0, False, 0.5, -1024.0, True, False),
]


@dataclass(frozen=True)
class CTSiteSpec:
    name: str
    index: int
    patients: int
    prevalence: float
    missing_rate: float
    sex_spelling: tuple[str, str]
    age_shift: float
    scanner: CTScanner


_SEX_SPELLINGS = [("F", "M"), ("female", "male"), ("0", "1")]


def genant_grade(loss: np.ndarray | float) -> np.ndarray:
    """Genant semi-quantitative grade of a height-loss fraction: <20 % 0, 20-25 % 1, 25-40 % 2, >=40 % 3."""
    return np.digitize(np.asarray(loss, dtype=np.float64), GENANT_BOUNDS).astype(np.int64)


def site_specs(cfg: FedmskConfig) -> list[CTSiteSpec]:
    s = cfg.synth
    specs = []
    for i, n, prev, miss in site_settings(cfg):
        rng = np.random.default_rng([cfg.seed, i, 17])
        specs.append(CTSiteSpec(site_name(i), i, n, prev, miss, _SEX_SPELLINGS[i % 3], float(rng.normal(0, 2.5)),
                                _SCANNERS[i % len(_SCANNERS)]))
    if not 32 <= s.image_size <= 256:
        raise ConfigError(f"config 'synth.image_size' is {s.image_size}; a CT slice matrix must be 32..256 pixels")
    return specs


# --- patients ------------------------------------------------------------------------------------
@dataclass
class Patient:
    age: float
    female: int
    bone: float  # trabecular density factor
    size: float  # vertebral size factor
    losses: np.ndarray  # true height loss per vertebra
    kinds: list[str]  # deformity type per vertebra
    true_loss: float
    oracle_grade: int
    label: int  # the radiologist's grade (from the measured loss)


def sample_patients(spec: CTSiteSpec, n: int, rng: np.random.Generator) -> list[Patient]:
    age = np.clip(rng.normal(68.0 + spec.age_shift, 10.0, n), 45.0, 95.0).round()
    female = (rng.random(n) < 0.55).astype(np.int64)
    risk = 0.08 * (age - 68.0) + 0.7 * female + rng.normal(0.0, 1.0, n)
    fractured = risk > np.quantile(risk, 1.0 - spec.prevalence)
    out = []
    for i in range(n):
        losses = rng.uniform(0.0, NORMAL_DEFORMITY, N_VERTEBRAE)
        kinds = [str(k) for k in rng.choice(DEFORMITIES, N_VERTEBRAE)]
        if fractured[i]:
            grade = int(rng.choice([1, 2, 3], p=GRADE_MIX))
            losses[int(rng.integers(N_VERTEBRAE))] = rng.uniform(*GRADE_BANDS[grade])
        true_loss = float(losses.max())
        measured = true_loss + rng.normal(0.0, READ_NOISE)
        bone = float(np.clip(1.0 - 0.01 * (age[i] - 68.0) - 0.12 * female[i] + rng.normal(0, 0.08), 0.5, 1.3))
        size = float(np.clip(rng.normal(1.0 - 0.07 * female[i], 0.05), 0.85, 1.1))
        out.append(Patient(float(age[i]), int(female[i]), bone, size, losses, kinds, true_loss,
                           int(genant_grade(true_loss)), int(genant_grade(measured))))
    return out


# --- rendering -----------------------------------------------------------------------------------
def render_hu(p: Patient, sc: CTScanner, matrix: int, n_slices: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """The patient's CT in HU, [slices, rows, cols] (feet to head), and the z of slice 0 in mm.

    Analytic anatomy sampled at ``Z_SUBSAMPLES`` depths across each slice's thickness and
    averaged (partial volume), then the kernel's smoothing and noise.
    """
    xs = (np.arange(matrix) - (matrix - 1) / 2) * sc.pixel_mm
    x = xs[None, None, :]
    y = xs[None, :, None]
    z0 = -(n_slices - 1) / 2 * sc.slice_mm
    offsets = (np.arange(Z_SUBSAMPLES) - (Z_SUBSAMPLES - 1) / 2) / Z_SUBSAMPLES * sc.thickness_mm
    z = (z0 + np.arange(n_slices)[:, None] * sc.slice_mm + offsets[None, :]).reshape(-1)[:, None, None]

    # spine centre jitters with patient positioning; the body sits anterior of the spine
    cx, cy = rng.normal(0.0, 3.0), rng.normal(-8.0, 3.0)
    a, b = 21.0 * p.size, 15.5 * p.size  # vertebral body half-width, half-depth (mm)
    # the trunk (a 34 x 22 cm ellipse, posterior skin ~7 cm behind the vertebral body centre)
    # mostly fills the targeted field of view: soft tissue, a subcutaneous fat ring, air outside
    ell = ((x - cx) / 170.0) ** 2 + ((y - (cy - 40.0)) / 110.0) ** 2
    hu = np.where(ell <= 1.0, np.where(ell <= 0.8, 45.0, -95.0), -1000.0)
    hu = np.broadcast_to(hu, (z.shape[0], matrix, matrix)).copy()

    u, v = (x - cx) / a, (y - cy) / b
    r2 = u**2 + v**2
    inside = r2 <= 1.0
    t = np.clip((v + 1.0) / 2.0, 0.0, 1.0)  # 0 anterior, 1 posterior (+y is posterior)
    rim = np.sqrt(np.clip(r2, 0.0, None)) > 1.0 - 1.5 / min(a, b)
    height = BODY_HEIGHT_MM * p.size
    pitch = height + DISC_MM
    stack_bottom = -(N_VERTEBRAE * height + (N_VERTEBRAE - 1) * DISC_MM) / 2
    disc = inside & (z > stack_bottom) & (z < stack_bottom + N_VERTEBRAE * pitch - DISC_MM)
    hu[np.broadcast_to(disc, hu.shape)] = 85.0
    canal_y = cy + b + 8.0
    d_canal = np.sqrt((x - cx) ** 2 + (y - canal_y) ** 2)
    arch = ((d_canal > 7.0) & (d_canal < 11.5) & (y > cy + b - 1.0)) | ((np.abs(x - cx) < 3.0) & (y > canal_y + 10.0) & (y < canal_y + 27.0))
    for k in range(N_VERTEBRAE):
        bottom = stack_bottom + k * pitch
        loss = p.losses[k]
        profile = {"wedge": 1.0 - t, "biconcave": np.clip(1.0 - r2, 0.0, 1.0), "crush": t}[p.kinds[k]]
        if p.kinds[k] == "biconcave":  # both endplates cave in
            lo = bottom + 0.5 * loss * height * profile
            hi = bottom + height - 0.5 * loss * height * profile
        else:  # the superior endplate drops
            lo = bottom + 0.0 * profile
            hi = bottom + height * (1.0 - loss * profile)
        in_body = inside & (z >= lo) & (z <= hi)
        shell = rim | (z < lo + 1.2) | (z > hi - 1.2)
        trabecular = 190.0 * p.bone * (1.0 + 0.5 * max(loss - NORMAL_DEFORMITY, 0.0))  # compacted when fractured
        hu = np.where(in_body, np.where(shell, 600.0 * p.bone + 150.0, trabecular), hu)
        in_arch = arch & (z > bottom + 0.15 * height) & (z < bottom + 0.85 * height)
        hu = np.where(in_arch, 450.0 * p.bone + 100.0, hu)
    hu = hu.reshape(n_slices, Z_SUBSAMPLES, matrix, matrix).mean(axis=1)
    if sc.blur_px > 0:
        hu = gaussian_filter(hu, sigma=(0.0, sc.blur_px, sc.blur_px))
    hu = hu + rng.normal(0.0, sc.noise_hu, hu.shape)
    return hu.astype(np.float32), z0


def stored_values(hu: np.ndarray, sc: CTScanner) -> np.ndarray:
    raw = np.rint((np.clip(hu, -1024.0, 3071.0) - sc.intercept) / sc.slope)
    return raw.astype(np.int16) if sc.signed else np.clip(raw, 0, 65535).astype(np.uint16)


# --- DICOM -----------------------------------------------------------------------------------------
def _base_dataset(sc: CTScanner, pid: str, sex: str, uids: dict[str, str], sop_class: str, rows: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid(entropy_srcs=["fedmsk-synth-ct"])
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids["study"], uids["series"], uids["frame"]
    ds.PatientID, ds.PatientName, ds.PatientSex = pid, f"SYNTH^{pid}", sex
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240105", "101500", "1", uids["series"][-12:]
    ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = "CT", "fedmsk synthetic", sc.model
    ds.BodyPartExamined, ds.SeriesDescription, ds.SeriesNumber = "LSPINE", f"SPINE {sc.kernel}", 3
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.KVP, ds.ConvolutionKernel = "120", sc.kernel
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if sc.signed else 0
    ds.WindowCenter, ds.WindowWidth = "40", "400"  # the PACS default (soft tissue); the task sets its own
    return ds


def _rescale(ds: Dataset, sc: CTScanner) -> None:
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = f"{sc.intercept:g}", f"{sc.slope:g}", "HU"


class _SliceWriter:
    """Writes a series' slice files, encoding the elements all slices share only once.

    pydicom's ``dcmwrite`` encodes every element of every file (~10 ms for a CT slice on this
    machine); the slices of one series differ in five elements only. The shared elements are
    encoded once by pydicom into byte segments, and each file is those segments with its own
    five elements between them, encoded here (Explicit VR Little Endian: tag, VR, length,
    value padded to even length). The file meta group differs only in the instance UID, which
    has the same length for every slice. ``tests/test_vertebral_synth.py`` checks the result is
    byte-identical to ``dcmwrite``'s.
    """

    VARYING = (("SOPInstanceUID", "UI"), ("InstanceNumber", "IS"), ("ImagePositionPatient", "DS"),
               ("SliceLocation", "DS"), ("PixelData", "OW"))

    def __init__(self, ds: Dataset, uid_template: str) -> None:
        tags = sorted(ds.keys())
        cut = [tag_for_keyword(k) for k, _ in self.VARYING]
        assert cut == sorted(cut)
        self.segments: list[bytes] = []
        for lo, hi in zip([-1, *cut], [*cut, 1 << 33]):
            part = Dataset()
            for tag in tags:
                if lo < tag < hi:
                    part[tag] = ds[tag]
            self.segments.append(_encode(part))
        meta = FileMetaDataset(ds.file_meta)
        meta.MediaStorageSOPInstanceUID = uid_template
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        fp.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fp, meta)
        self.uid_template = _padded(uid_template.encode(), b"\0")
        self.meta = fp.getvalue()
        assert self.meta.count(self.uid_template) == 1

    def write(self, path: Path, values: dict[str, str | bytes]) -> None:
        uid = _padded(str(values["SOPInstanceUID"]).encode(), b"\0")
        if len(uid) != len(self.uid_template):
            raise ValueError(f"instance UID {values['SOPInstanceUID']} differs in length from the series template")
        out = [self.meta.replace(self.uid_template, uid)]
        for segment, (keyword, vr) in zip(self.segments, self.VARYING):
            out.append(segment)
            value = values[keyword]
            out.append(_element(tag_for_keyword(keyword), vr, value if isinstance(value, bytes) else value.encode()))
        out.append(self.segments[-1])
        path.write_bytes(b"".join(out))


def _instance_uid(uids: dict[str, str], k: int) -> str:
    """Slice k's SOP Instance UID: the series UID + a 4-digit suffix, so every slice's has one length."""
    return f"{uids['series']}.{k + 1001}"


def _padded(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _element(tag: int, vr: str, value: bytes) -> bytes:
    value = _padded(value, b"\0" if vr in ("UI", "OW") else b" ")
    if vr == "OW":
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


def _encode(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def write_series(folder: Path, stored: np.ndarray, origin: tuple[float, float, float], sc: CTScanner, pid: str, sex: str,
                 uids: dict[str, str], rng: np.random.Generator, drop: int | None = None) -> int:
    """One CT Image Storage file per slice, in shuffled file names; returns the files written."""
    folder.mkdir(parents=True)
    n = stored.shape[0]
    ds = _base_dataset(sc, pid, sex, uids, CT_STORAGE, stored.shape[1])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [f"{sc.pixel_mm:g}", f"{sc.pixel_mm:g}"]
    ds.SliceThickness, ds.SpacingBetweenSlices = f"{sc.thickness_mm:g}", f"{sc.slice_mm:g}"
    _rescale(ds, sc)
    writer = _SliceWriter(ds, _instance_uid(uids, 0))
    names = rng.permutation(n) + 1
    written = 0
    for k in range(n):
        if k == drop:
            continue
        z = f"{origin[2] + k * sc.slice_mm:.3f}"
        writer.write(folder / f"IM{names[k]:04d}", {
            "SOPInstanceUID": _instance_uid(uids, k), "InstanceNumber": str(n - k if sc.head_first else k + 1),
            "ImagePositionPatient": f"{origin[0]:.3f}\\{origin[1]:.3f}\\{z}", "SliceLocation": z,
            "PixelData": stored[k].astype(stored.dtype.newbyteorder("<")).tobytes()})
        written += 1
    return written


def write_enhanced(path: Path, stored: np.ndarray, origin: tuple[float, float, float], sc: CTScanner, pid: str, sex: str,
                   uids: dict[str, str], rng: np.random.Generator, drop: int | None = None) -> None:
    """One Enhanced CT file: frames in shuffled order, each with its PlanePositionSequence."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = _base_dataset(sc, pid, sex, uids, ENHANCED_CT_STORAGE, stored.shape[1])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _instance_uid(uids, 0)
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    order = [k for k in rng.permutation(stored.shape[0]) if k != drop]
    ds.NumberOfFrames = len(order)
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [f"{sc.pixel_mm:g}", f"{sc.pixel_mm:g}"]
    measures.SliceThickness, measures.SpacingBetweenSlices = f"{sc.thickness_mm:g}", f"{sc.slice_mm:g}"
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    transform = Dataset()
    _rescale(transform, sc)
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in order:
        item, position, content = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [f"{origin[0]:.3f}", f"{origin[1]:.3f}", f"{origin[2] + k * sc.slice_mm:.3f}"]
        content.InStackPositionNumber = int(k + 1)
        item.PlanePositionSequence = Sequence([position])
        item.FrameContentSequence = Sequence([content])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = stored[order].tobytes()
    ds.save_as(path, enforce_file_format=True)


# --- the federation ------------------------------------------------------------------------------
def _n_slices(sc: CTScanner) -> int:
    cover = N_VERTEBRAE * BODY_HEIGHT_MM * 1.2 + (N_VERTEBRAE - 1) * DISC_MM + 16.0  # the tallest stack + margins
    return int(np.ceil(cover / sc.slice_mm))


def _write_site(root: Path, spec: CTSiteSpec, cfg: FedmskConfig, advance: Callable[[], None]) -> list[dict[str, str]]:
    rng = np.random.default_rng([cfg.seed, spec.index, 11])
    n = spec.patients
    patients = sample_patients(spec, n + 1, rng)  # the extra one is the series without a clinical row
    ids = [f"{spec.name.removeprefix('site_').upper()}{k}" for k in rng.choice(np.arange(100000, 999999), n + 1, replace=False)]
    bad_age, no_image, gap = (int(k) for k in rng.choice(n, size=3, replace=False))
    site_dir = root / spec.name
    (site_dir / "images").mkdir(parents=True)
    female, male = spec.sex_spelling
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["patient_id", "age", "sex", cfg.task.label_column])
    for i, p in enumerate(patients[:n]):
        age = "150" if i == bad_age else ("" if rng.random() < spec.missing_rate else f"{p.age:.0f}")
        sex = "" if rng.random() < spec.missing_rate / 2 else (female if p.female else male)
        w.writerow([ids[i], age, sex, p.label])
    (site_dir / "clinical.csv").write_text(buf.getvalue())

    sc = spec.scanner
    matrix, n_slices = cfg.synth.image_size, _n_slices(sc)
    folders = rng.choice(np.arange(10000, 99999), n + 1, replace=False)
    for i, p in enumerate(patients):
        if i == no_image:
            advance()
            continue
        img_rng = np.random.default_rng([cfg.seed, spec.index, 12, i])
        hu, z0 = render_hu(p, sc, matrix, n_slices, img_rng)
        corner = -(matrix - 1) / 2 * sc.pixel_mm
        origin = (corner, corner, 1000.0 + z0)  # the table position offsets z
        ent = [str(cfg.seed), spec.name, ids[i]]
        uids = {k: generate_uid(entropy_srcs=[*ent, k])[:56] for k in ("study", "series", "frame")}  # room for ".<slice>"
        sex = "F" if p.female else "M"
        drop = n_slices // 2 if i == gap else None
        stored = stored_values(hu, sc)
        if sc.enhanced:
            write_enhanced(site_dir / "images" / f"S{folders[i]}.dcm", stored, origin, sc, ids[i], sex, uids, img_rng, drop)
        else:
            write_series(site_dir / "images" / f"S{folders[i]}", stored, origin, sc, ids[i], sex, uids, img_rng, drop)
        advance()
    return [{"site": spec.name, "patient_id": ids[i], "latent_score": f"{p.true_loss:.6f}", "label": str(p.label),
             "oracle_grade": str(p.oracle_grade), "fractured_vertebra": str(int(np.argmax(p.losses))),
             "deformity": p.kinds[int(np.argmax(p.losses))]} for i, p in enumerate(patients[:n])]


def _readme(cfg: FedmskConfig, specs: list[CTSiteSpec]) -> str:
    lines = [
        "fedmsk synthetic CT federation for vertebral fracture screening (`fedmsk synth task=vertebral_fracture`)",
        f"seed={cfg.seed} num_sites={cfg.num_sites} slice matrix={cfg.synth.image_size}",
        "",
        "Layout: <site>/clinical.csv (patient_id, age, sex, genant_grade); <site>/images/S*/IM* one file per slice",
        "(or <site>/images/S*.dcm, one Enhanced CT file per series), linked by PatientID; slices ordered only by",
        "ImagePositionPatient. oracle.csv (site, patient_id, latent_score = true height loss of the worst vertebra,",
        "label = radiologist's grade, oracle_grade = Genant grade of the true loss) is never read by training.",
        "",
        f"Genant bands: grade 1 from {GENANT_BOUNDS[0]:.0%}, 2 from {GENANT_BOUNDS[1]:.0%}, 3 from {GENANT_BOUNDS[2]:.0%} height loss;",
        f"fractured patients: mild/moderate/severe {GRADE_MIX}; intact vertebrae deform 0-{NORMAL_DEFORMITY:.0%};",
        f"label = grade of (true loss + N(0, {READ_NOISE})); {N_VERTEBRAE} vertebrae of {BODY_HEIGHT_MM:g} mm, discs {DISC_MM:g} mm.",
        "",
        "Sites:",
    ]
    for sp in specs:
        sc = sp.scanner
        lines.append(f"  {sp.name}: {sp.patients} patients, fracture prevalence {sp.prevalence:.2f}, {sc.model}, "
                     f"{sc.slice_mm:g} mm slices, {sc.pixel_mm:g} mm pixels, kernel {sc.kernel} (noise {sc.noise_hu:g} HU), "
                     f"{'signed' if sc.signed else 'unsigned'} rescale {sc.slope:g}/{sc.intercept:g}, "
                     f"{'Enhanced CT (one file)' if sc.enhanced else 'one file per slice'}")
    lines += ["", "Deliberately unusable at every site: age 150, a patient without a series, a series without a",
              "clinical row, a series with one slice missing from the middle.", ""]
    return "\n".join(lines)


def total_steps(cfg: FedmskConfig) -> int:
    return sum(sp.patients + 1 for sp in site_specs(cfg))


def describe(cfg: FedmskConfig) -> tuple[list[str], list[list[str]]]:
    """The `fedmsk synth` summary table: columns and one row per site."""
    rows = [[sp.name, str(sp.patients), f"{sp.prevalence:.2f}", sp.scanner.model,
             f"{sp.scanner.slice_mm:g}/{sp.scanner.pixel_mm:g} mm", sp.scanner.kernel,
             "enhanced" if sp.scanner.enhanced else "per slice"] for sp in site_specs(cfg)]
    return ["site", "patients", "fractures", "scanner", "slice/pixel", "kernel", "files"], rows


def write_federation(cfg: FedmskConfig, advance: Callable[[], None] | None = None) -> Path:
    """Write cfg.num_sites CT sites + oracle.csv + README.txt under cfg.data_root (swapped in at the end)."""
    specs = site_specs(cfg)
    step = advance or (lambda: None)
    return publish_federation(Path(cfg.data_root), specs, lambda tmp, spec: _write_site(tmp, spec, cfg, step),
                              lambda: _readme(cfg, specs), f"task {cfg.task.name}, seed {cfg.seed}")
