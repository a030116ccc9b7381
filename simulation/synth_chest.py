"""Synthetic chest radiographs for osteoporosis screening: `fedmsk synth task=osteoporosis_chest`.

The seed study (Tang et al., JMIR Med Inform 2025) screens osteoporosis (DXA T-score <= -2.5)
from chest radiographs taken for other reasons plus the clinical record. These hospitals follow
the site data contract like the hip generator (``simulation.synth``, whose scanner palette,
acquisition, DICOM writer and publishing they call) and draw a PA chest in which bone density
is visible: the clavicles, the posterior ribs and the thoracic vertebral bodies have a cortical
shell whose thickness and a trabecular core whose brightness follow the patient's bone mineral
density, and the trabecular core is porous (holes in a fine texture) where density is low.

Latent model (also written to ``<data_root>/README.txt``):

- True T-score T = c * (clinical part) + i * 1.0 * u + site offset, u ~ N(0, 1) an individual
  term that only the radiograph shows (c = synth.clinical_signal, i = synth.image_signal).
  Clinical part: -1.0 - 0.035 (age - 65) (x 1.3 in women: post-menopausal loss) - 0.6 female
  + 0.07 (BMI - 25) - 0.6 glucocorticoids - 0.35 current / 0.15 former smoker - 0.3 alcohol.
- Prior fragility fracture is a consequence of low density: P = sigmoid(-2.3 - 0.9 T), so the
  table carries it as a risk factor without causing it.
- Measured T-score = T + N(0, 0.25) (DXA precision); label = 1[measured <= -2.5]. The site
  offset moves the whole population so that the site's configured prevalence holds exactly.
- The image shows bone density through T + N(0, IMAGE_NOISE) (chest bones are not the DXA site)
  as density factor 1 + 0.11 x that, and soft tissue that thickens with BMI (which also brightens
  the bones: a confounder the model must see past). The table lacks u; the image lacks age, sex,
  the medication and the habits: each modality carries part of the signal.

``oracle.csv`` holds latent_score = -T (higher = more osteoporotic) and the true T-score.
Sites differ in scanner (``synth``'s palette), size, prevalence, population (age shift), the
spellings of sex and of the yes/no and smoking columns, missingness (one site exports no alcohol
column), and each holds deliberately unusable records: age 150, a smoking status written
'occasionally' (not an accepted spelling), a patient without an image and an image without a row.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid
from scipy.ndimage import gaussian_filter

from shared.config import ConfigError, FedmskConfig
from simulation import synth
from simulation.anatomy import REF_SIZE, _bone, _chord, _segment_distance

OSTEOPOROSIS_T = -2.5
DXA_NOISE = 0.25
IMAGE_NOISE = 0.35
HIDDEN_WEIGHT = 1.0
BMD_PER_T = 0.11  # relative bone mineral density per T-score unit (~0.12 g/cm2 around 1.0)
FRACTURE_LOGIT = (-2.3, -0.9)  # P(prior fracture) = sigmoid(a + b T)

_YES_NO = [("yes", "no"), ("Y", "N"), ("1", "0"), ("true", "false")]
_SMOKING = [("never", "former", "current"), ("non-smoker", "ex-smoker", "smoker"), ("0", "1", "2")]
BAD_SPELLING = "occasionally"  # the smoking status each site writes once, which no task accepts
NO_ALCOHOL_SITE = 2  # the site (index, cycled over 4) whose export has no alcohol column

_MU_SOFT = 0.0105
_MU_LUNG = 0.0085  # attenuation the air in the lungs takes away from the soft-tissue path


@dataclass(frozen=True)
class ChestSite:
    name: str
    index: int
    patients: int
    prevalence: float
    missing_rate: float
    scanner: synth.Scanner
    sex_spelling: tuple[str, str]
    yes_no: tuple[str, str]
    smoking: tuple[str, str, str]
    age_shift: float
    has_alcohol: bool


def site_specs(cfg: FedmskConfig) -> list[ChestSite]:
    for field_name in ("image_signal", "clinical_signal"):
        if not 0.0 <= getattr(cfg.synth, field_name) <= 5.0:
            raise ConfigError(f"config 'synth.{field_name}' is {getattr(cfg.synth, field_name)}; use a weight in [0, 5]")
    if cfg.synth.image_size < 32:
        raise ConfigError(f"config 'synth.image_size' is {cfg.synth.image_size}; use at least 32 pixels")
    specs = []
    for i, n, prev, miss in synth.site_settings(cfg):
        rng = np.random.default_rng([cfg.seed, i, 21])
        specs.append(ChestSite(
            name=synth.site_name(i), index=i, patients=n, prevalence=prev, missing_rate=miss,
            scanner=synth._SCANNERS[i % len(synth._SCANNERS)], sex_spelling=synth._SEX_SPELLINGS[i % len(synth._SEX_SPELLINGS)],
            yes_no=_YES_NO[i % len(_YES_NO)], smoking=_SMOKING[i % len(_SMOKING)], age_shift=float(rng.normal(0.0, 2.5)),
            has_alcohol=i % 4 != NO_ALCOHOL_SITE,
        ))
    return specs


@dataclass
class ChestPopulation:
    female: np.ndarray
    age: np.ndarray
    bmi: np.ndarray
    glucocorticoids: np.ndarray
    smoking: np.ndarray  # 0 never, 1 former, 2 current
    alcohol: np.ndarray
    prior_fracture: np.ndarray
    hidden: np.ndarray
    t_true: np.ndarray
    t_measured: np.ndarray
    label: np.ndarray


def clinical_t(female: np.ndarray, age: np.ndarray, bmi: np.ndarray, gluco: np.ndarray, smoking: np.ndarray,
               alcohol: np.ndarray) -> np.ndarray:
    """The part of the T-score the risk factors explain (before the site offset)."""
    age_loss = 0.035 * (age - 65.0) * np.where(female == 1, 1.3, 1.0)
    return (-1.0 - age_loss - 0.6 * female + 0.07 * (bmi - 25.0) - 0.6 * gluco
            - np.select([smoking == 2, smoking == 1], [0.35, 0.15], 0.0) - 0.3 * alcohol)


def sample_population(spec: ChestSite, n: int, rng: np.random.Generator, image_signal: float = 1.0,
                      clinical_signal: float = 1.0) -> ChestPopulation:
    female = (rng.random(n) < 0.7).astype(np.int64)
    age = np.clip(rng.normal(67.0 + spec.age_shift, 9.0, n), 45.0, 95.0).round()
    bmi = np.clip(rng.normal(25.5, 4.2, n), 15.0, 45.0).round(1)
    gluco = (rng.random(n) < 0.08).astype(np.int64)
    smoking = rng.choice(3, size=n, p=[0.55, 0.30, 0.15])
    alcohol = (rng.random(n) < 0.10).astype(np.int64)
    hidden = rng.normal(0.0, 1.0, n)
    t = clinical_signal * clinical_t(female, age, bmi, gluco, smoking, alcohol) + image_signal * HIDDEN_WEIGHT * hidden
    noise = rng.normal(0.0, DXA_NOISE, n)
    t = t + (OSTEOPOROSIS_T - np.quantile(t + noise, spec.prevalence))  # the site's prevalence, exactly
    measured = t + noise
    a, b = FRACTURE_LOGIT
    fracture = (rng.random(n) < 1.0 / (1.0 + np.exp(-(a + b * t)))).astype(np.int64)
    return ChestPopulation(female, age, bmi, gluco, smoking, alcohol, fracture, hidden, t, measured,
                           (measured <= OSTEOPOROSIS_T).astype(np.int64))


@dataclass(frozen=True)
class ChestParams:
    """What one radiograph shows: bone density factor, body width (BMI), skeleton size, positioning."""

    density: float
    soft_radius: float
    bone_scale: float
    shift_x: float = 0.0
    shift_y: float = 0.0
    angle_deg: float = 0.0


def chest_params(pop: ChestPopulation, i: int, rng: np.random.Generator) -> ChestParams:
    seen_t = pop.t_true[i] + rng.normal(0.0, IMAGE_NOISE)
    return ChestParams(
        density=float(np.clip(1.0 + BMD_PER_T * seen_t, 0.45, 1.5)),
        soft_radius=float(np.clip(40.0 + 1.1 * (pop.bmi[i] - 25.0) + rng.normal(0, 1.5), 30.0, 60.0)),
        bone_scale=float(np.clip(rng.normal(0.94 if pop.female[i] else 1.04, 0.03), 0.85, 1.15)),
        shift_x=float(rng.normal(0, 2.0)), shift_y=float(rng.normal(0, 2.0)), angle_deg=float(rng.normal(0, 1.5)),
    )


def render_chest(p: ChestParams, size: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """The ideal PA chest radiograph, float32 [size, size] in [0, 1] (0 = air), drawn with the
    projection primitives of ``simulation.anatomy`` (chords through capsules)."""
    k = REF_SIZE / size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = REF_SIZE / 2.0
    u, v = (xx + 0.5) * k - c, (yy + 0.5) * k - c
    cos, sin = math.cos(math.radians(p.angle_deg)), math.sin(math.radians(p.angle_deg))
    x = (cos * u + sin * v) / scale + c - p.shift_x
    y = (-sin * u + cos * v) / scale + c - p.shift_y

    att = _MU_SOFT * _chord(p.soft_radius, _segment_distance(x, y, (64.0, 0.0), (64.0, 150.0)))
    for side in (-1.0, 1.0):  # lungs take air out of the path; the heart sits left of the midline
        att = att - _MU_LUNG * _chord(19.0, _segment_distance(x, y, (64.0 + side * 25.0, 30.0), (64.0 + side * 27.0, 92.0)))
    att = att + 0.6 * _MU_SOFT * _chord(20.0, np.hypot(x - 72.0, y - 90.0))
    att = np.maximum(att, 0.0)

    d, b = p.density, p.bone_scale
    # trabecular porosity: a fine random texture, holes deeper where density is low
    texture = gaussian_filter(rng.normal(0.0, 1.0, x.shape), 0.6 * size / REF_SIZE + 0.3)
    texture = texture / (texture.std() + 1e-8)
    porosity = float(np.clip(0.75 - 0.55 * d, 0.0, 0.6))
    core = np.clip(1.0 - porosity * (texture > 0.3), 0.2, 1.0)
    bones = np.zeros_like(att)

    def bone(dist: np.ndarray, radius: float, cortex_frac: float) -> np.ndarray:
        cortex = radius * float(np.clip(cortex_frac * (0.5 + 0.5 * d), 0.08, 0.6))
        return _bone(dist, radius, cortex, d)

    for j in range(10):  # thoracic vertebral bodies behind the mediastinum
        yv = 12.0 + 11.0 * j
        bones = bones + bone(_segment_distance(x, y, (60.0, yv), (68.0, yv)), 4.6 * b, 0.3)
    for side in (-1.0, 1.0):
        bones = bones + bone(_segment_distance(x, y, (64.0 + side * 7.0, 22.0), (64.0 + side * 40.0, 13.0)), 3.3 * b, 0.35)
        for j in range(9):  # posterior ribs: out from the spine and down the lateral wall
            y0 = 16.0 + 9.5 * j
            mid = (64.0 + side * 34.0, y0 - 2.0)
            bones = bones + bone(_segment_distance(x, y, (64.0 + side * 6.0, y0), mid), 2.5 * b, 0.35)
            bones = bones + bone(_segment_distance(x, y, mid, (64.0 + side * 46.0, y0 + 14.0)), 2.3 * b, 0.35)
    return np.clip((att + bones * core) / 1.6, 0.0, 1.0).astype(np.float32)


def _yes_no(value: int, spelling: tuple[str, str]) -> str:
    return spelling[0] if value else spelling[1]


def _write_site(root: Path, spec: ChestSite, cfg: FedmskConfig, advance: Callable[[], None]) -> list[dict[str, str]]:
    rng = np.random.default_rng([cfg.seed, spec.index, 22])
    n = spec.patients
    pop = sample_population(spec, n + 1, rng, cfg.synth.image_signal, cfg.synth.clinical_signal)  # +1: image without a row
    ids = [f"{spec.name.removeprefix('site_').upper()}{k}" for k in rng.choice(np.arange(100000, 999999), n + 1, replace=False)]
    bad_age, bad_smoking, no_image = (int(k) for k in rng.choice(n, size=3, replace=False))
    miss = spec.missing_rate
    site_dir = root / spec.name
    (site_dir / "images").mkdir(parents=True)
    header = ["patient_id", "age", "sex", "bmi", "prior_fracture", "glucocorticoids", "smoking"]
    header += ["alcohol"] if spec.has_alcohol else []
    header += ["t_score", cfg.task.label_column]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for i in range(n):
        gone = lambda rate: rng.random() < rate  # noqa: E731 - one draw per cell, in column order
        row = [ids[i], "150" if i == bad_age else f"{pop.age[i]:.0f}", spec.sex_spelling[pop.female[i]],
               "" if gone(min(0.03, miss / 2)) else f"{pop.bmi[i]:.1f}",
               "" if gone(miss / 3) else _yes_no(pop.prior_fracture[i], spec.yes_no),
               "" if gone(miss / 3) else _yes_no(pop.glucocorticoids[i], spec.yes_no),
               BAD_SPELLING if i == bad_smoking else ("" if gone(miss / 2) else spec.smoking[pop.smoking[i]])]
        if spec.has_alcohol:
            row.append("" if gone(miss) else _yes_no(pop.alcohol[i], spec.yes_no))
        row += [f"{np.clip(pop.t_measured[i], -5.9, 3.9):.1f}", int(pop.label[i])]  # a DXA report's range (strong mixes overshoot)
        w.writerow(row)
    (site_dir / "clinical.csv").write_text(buf.getvalue())

    sc = spec.scanner
    scale = synth.REFERENCE_SPACING_MM / sc.spacing_mm
    order = rng.permutation(n + 1)
    for i in range(n + 1):
        if i == no_image:
            advance()
            continue
        img_rng = np.random.default_rng([cfg.seed, spec.index, 23, i])
        ideal = render_chest(chest_params(pop, i, img_rng), cfg.synth.image_size, scale, img_rng)
        pixels = synth.acquire(ideal, sc, img_rng)
        ent = [str(cfg.seed), spec.name, ids[i], "chest"]
        uids = tuple(generate_uid(entropy_srcs=[*ent, part]) for part in ("study", "series", "instance"))
        month, day = int(img_rng.integers(1, 13)), int(img_rng.integers(1, 29))
        ds = synth.dicom_dataset(pixels, sc, ids[i], "F" if pop.female[i] else "M", uids, f"2024{month:02d}{day:02d}")
        ds.BodyPartExamined, ds.ViewPosition, ds.SeriesDescription = "CHEST", "PA", "CHEST PA"
        folder = site_dir / "images" / f"2024{month:02d}"
        folder.mkdir(exist_ok=True)
        ds.save_as(folder / f"CX{order[i] + 1:05d}.dcm", enforce_file_format=True)
        advance()
    return [{"site": spec.name, "patient_id": ids[i], "latent_score": f"{-pop.t_true[i]:.6f}", "label": str(int(pop.label[i])),
             "t_score_true": f"{pop.t_true[i]:.4f}"} for i in range(n)]


def _readme(cfg: FedmskConfig, specs: list[ChestSite]) -> str:
    c, i = cfg.synth.clinical_signal, cfg.synth.image_signal
    lines = [
        "fedmsk synthetic chest-radiograph federation for osteoporosis screening (`fedmsk synth task=osteoporosis_chest`)",
        f"seed={cfg.seed} num_sites={cfg.num_sites} image_size={cfg.synth.image_size} image_signal={i} clinical_signal={c}",
        "",
        "Layout: <site>/clinical.csv, <site>/images/<YYYYMM>/CX*.dcm (PA chest, linked by PatientID);",
        "oracle.csv (site, patient_id, latent_score = -true T-score, label, t_score_true) is never read by training.",
        "",
        "True T-score T = c*(-1.0 - 0.035*(age-65)*(1.3 if female) - 0.6*female + 0.07*(BMI-25) - 0.6*glucocorticoids",
        f"                  - 0.35 current / 0.15 former smoker - 0.3*alcohol) + i*{HIDDEN_WEIGHT}*u + site offset,",
        f"  u ~ N(0,1) visible only in the image; c = {c}, i = {i}; the offset gives each site its prevalence.",
        f"Prior fracture ~ Bernoulli(sigmoid({FRACTURE_LOGIT[0]} {FRACTURE_LOGIT[1]:+}*T)) (a consequence of low density).",
        f"Measured T-score (t_score column, not a model input) = T + N(0, {DXA_NOISE}); osteoporosis = measured <= {OSTEOPOROSIS_T}.",
        "Image: clavicles, posterior ribs, thoracic vertebrae with cortex thickness and trabecular density from",
        f"  1 + {BMD_PER_T}*(T + N(0, {IMAGE_NOISE})), trabecular holes where density is low; soft tissue width ~ BMI.",
        "",
        "Sites:",
    ]
    for sp in specs:
        sc = sp.scanner
        lines.append(f"  {sp.name}: {sp.patients} patients, prevalence {sp.prevalence:.2f}, missing rate {sp.missing_rate:.2f}, "
                     f"sex {'/'.join(sp.sex_spelling)}, yes/no {'/'.join(sp.yes_no)}, smoking {'/'.join(sp.smoking)}, "
                     f"{'alcohol column' if sp.has_alcohol else 'no alcohol column'}, {sc.modality} {sc.photometric} "
                     f"{sc.bits_stored}-bit, {sc.spacing_mm} mm")
    lines += ["", f"Deliberately unusable at every site: age 150, smoking='{BAD_SPELLING}', a patient without an image,",
              "an image without a clinical row. Missing: alcohol at the site's rate, smoking at half, prior_fracture and",
              "glucocorticoids at a third, BMI at min(0.03, rate/2).", ""]
    return "\n".join(lines)


def total_steps(cfg: FedmskConfig) -> int:
    return sum(sp.patients + 1 for sp in site_specs(cfg))


def describe(cfg: FedmskConfig) -> tuple[list[str], list[list[str]]]:
    rows = [[sp.name, str(sp.patients), f"{sp.prevalence:.2f}", f"{sp.scanner.modality} {sp.scanner.photometric} "
             f"{sp.scanner.bits_stored}-bit", f"{sp.missing_rate:.2f}", "/".join(sp.yes_no), "/".join(sp.smoking)]
            for sp in site_specs(cfg)]
    return ["site", "patients", "prevalence", "scanner", "missing", "yes/no", "smoking"], rows


def write_federation(cfg: FedmskConfig, advance: Callable[[], None] | None = None) -> Path:
    """Write cfg.num_sites chest sites + oracle.csv + README.txt under cfg.data_root (swapped in at the end)."""
    specs = site_specs(cfg)
    step = advance or (lambda: None)
    return synth.publish_federation(Path(cfg.data_root), specs, lambda tmp, spec: _write_site(tmp, spec, cfg, step),
                                    lambda: _readme(cfg, specs), f"task {cfg.task.name}, seed {cfg.seed}")
