"""One hospital's data as arrays: link clinical rows to images, decode, split, and build datasets.

``load_site`` reads a site folder (clinical.csv + images/ + optional manifest.csv), links rows
to images by the DICOM PatientID tag (or the manifest), picks the images the task asks for
(``task.image_select``), decodes and preprocesses them through the site's content-keyed cache,
and keeps usable labelled patients (unlabelled ones too when asked: they are counted, never an
issue). Everything else is a ``RecordIssue`` with file, reason
and what to do; no record makes it crash. ``split_indices`` and ``make_datasets`` turn the arrays
into train/val/test datasets whose clinical scaling is fitted on the training split only.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.cache import CACHE_DIRNAME, PreprocessCache, combined_key, content_key
from shared.clinical import ClinicalScaler, read_table
from shared.config import SplitConfig, TaskConfig
from shared.dicom import DicomError, clip, read_header, read_image
from shared.records import RecordIssue, issue
from shared.series import group_by_series, order_slices, read_volume
from shared.enhanced_ct import is_enhanced
from shared.masks import SiteMasks, mask_channels
from shared.transforms import preprocess, preprocessing_key, train_augmentation

if TYPE_CHECKING:  # torch and MONAI are imported where they run (datasets, CT volumes): a 2D check needs neither
    import torch

__all__ = ["RecordIssue", "SiteData", "load_site", "split_indices", "label_subset", "site_splits", "make_datasets",
           "image_files"]

# progress(stage, done, total): stage is "headers" (reading every file's tags) or "images" (decoding)
Progress = Callable[[str, int, int], None]
_SKIP_NAMES = {"DICOMDIR"}  # media directory index files: DICOM without an image, not records


@dataclass
class SiteData:
    """A site's usable labelled records; one row per selected image (one per patient unless
    ``task.image_select='all'``, where a patient's views share its patient_id)."""

    name: str
    root: Path
    patient_ids: list[str]
    images: np.ndarray  # float32 [N, 1, *image_size] in [0, 1]
    clinical_raw: np.ndarray  # float32 [N, len(task.columns)], NaN = missing
    labels: np.ndarray  # int64 [N]
    issues: list[RecordIssue] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # per row: the image file(s) it came from
    headers: dict[str, dict[str, Any]] = field(default_factory=dict)  # every readable file -> header facts
    cache_note: str = ""  # why the preprocessing cache was not used, if it was not
    clinical_problem: str = ""  # why clinical.csv as a whole is unusable (the check says this first)
    clinical_missing: dict[str, dict[str, int]] = field(default_factory=dict)  # column -> {as written: cells}
    masks: dict[str, int] = field(default_factory=dict)  # task.mask_labels set: found/missing/unreadable/... counts (shared.masks)
    # clinical rows with an empty label that ``labelled_only`` left out (not decoded, not an issue:
    # unlabelled patients are data for pretraining, not errors); with labelled_only=False they are rows, label -1
    unlabelled: int = 0


def image_files(root: Path) -> list[Path]:
    """Every regular file under <site>/images (any folder structure, any or no extension)."""
    folder = root / "images"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".") and p.name not in _SKIP_NAMES)


def read_manifest(root: Path) -> tuple[dict[Path, str], list[RecordIssue]]:
    """manifest.csv (patient_id,path[,series_role]) -> {file: patient_id}; paths relative to the site."""
    path = root / "manifest.csv"
    if not path.is_file():
        return {}, []
    try:
        text = path.read_bytes().decode("utf-8-sig", errors="replace")
        delimiter = ";" if text.split("\n", 1)[0].count(";") > text.split("\n", 1)[0].count(",") else ","
        rows = list(csv.DictReader(io.StringIO(text.replace("\x00", "")), delimiter=delimiter))
    except (OSError, csv.Error) as exc:
        return {}, [issue("manifest_unreadable", file="manifest.csv", detail=clip(str(exc)))]
    fields = {f.strip().casefold() for f in (rows[0].keys() if rows else []) if f}  # None: cells beyond the header
    if not {"patient_id", "path"} <= fields:
        return {}, [issue("manifest_unreadable", file=str(path), detail=f"header {sorted(fields)}")]
    mapping: dict[Path, str] = {}
    problems: list[RecordIssue] = []
    for line, row in enumerate(rows, start=2):
        row = {k.strip().casefold(): (v or "").strip() for k, v in row.items() if k}
        file = (root / row["path"]).resolve()
        if not file.is_file():
            problems.append(issue("manifest_file_missing", row["patient_id"], f"{path}:{line}", f"{row['path']} does not exist"))
            continue
        mapping[file] = row["patient_id"]
    return mapping, problems


@dataclass(frozen=True)
class _Unit:
    """What one model input is made of: one file (2D task) or one CT series (3D task)."""

    name: str  # the file, or the series folder + UID, as the report shows it
    files: tuple[str, ...]
    description: str  # SeriesDescription, for image_select=series_description
    order: tuple[int, int, str]  # SeriesNumber, InstanceNumber, name: a stable "first"


class _Loader:
    """The state of one load_site call (cache, issues, headers) so the steps stay small."""

    def __init__(self, root: Path, task: TaskConfig, progress: Progress | None, use_cache: bool, verify_all: bool) -> None:
        self.root, self.task, self.progress, self.verify_all = root, task, progress, verify_all
        self.resolved_root = root.resolve()
        self.cache = PreprocessCache(root / CACHE_DIRNAME if use_cache else None, preprocessing_key(task) | _volume_key(task))
        self.issues: list[RecordIssue] = []
        self.headers: dict[str, dict[str, Any]] = {}
        self.keys: dict[str, str] = {}

    def rel(self, path: Path) -> str:
        """The path as the report shows it: relative to the site folder (no resolve(): it is hot)."""
        for base in (self.root, self.resolved_root):
            if path.is_relative_to(base):
                return str(path.relative_to(base))
        return str(path)

    def scan(self) -> dict[str, list[str]]:
        """Read every file's header once; return patient_id -> [relative file] for readable images.

        A file is known by its path relative to the site folder, whether it was found under
        images/ or named by manifest.csv and whatever form of the site path was typed, so each
        file is read and reported once. Any failure on one file is that file's finding.
        """
        manifest, problems = read_manifest(self.root)
        self.issues.extend(problems)
        found: dict[str, Path] = {self.rel(p): p for p in image_files(self.root)}
        for path in manifest:
            found.setdefault(self.rel(path), path)
        listed = {self.rel(path): pid for path, pid in manifest.items()}
        by_patient: dict[str, list[str]] = defaultdict(list)
        for n, rel in enumerate(sorted(found), start=1):
            path = found[rel]
            try:
                key = self.keys[rel] = content_key(path)
                meta = self.cache.header(key, lambda: read_header(path))
            except DicomError as exc:
                self.issues.append(issue(exc.reason, listed.get(rel, ""), rel, exc.detail))
                continue
            except OSError as exc:  # unreadable file (permissions, vanished): a finding, not a crash
                self.issues.append(issue("decode_failed", listed.get(rel, ""), rel,
                                         f"reading the file: {clip(exc.strerror or str(exc))}",
                                         "make the file readable by the account running fedmsk, or re-export it"))
                continue
            finally:
                if self.progress:
                    self.progress("headers", n, len(found))
            self.headers[rel] = meta
            pid = listed.get(rel, meta["patient_id"]) if manifest else meta["patient_id"]
            if not pid:
                self.issues.append(issue("no_patient_id", file=rel, detail="PatientID (0010,0020) is empty"))
                continue
            by_patient[pid].append(rel)
        return by_patient

    def units(self, files: list[str]) -> list[_Unit]:
        """A patient's files as candidate inputs, in a stable order."""
        if self.task.spatial_dims == 2:
            units = [_Unit(rel, (rel,), self.headers[rel]["series_description"],
                           (self.headers[rel]["series_number"], self.headers[rel]["instance_number"], rel)) for rel in files]
        else:
            units = []
            for uid, members in group_by_series(self.headers, files).items():
                first = self.headers[members[0]]
                folder = str(Path(min(members)).parent)
                name = f"{folder}/ (series {uid}, {len(members)} files)"
                units.append(_Unit(name, tuple(sorted(members)), first["series_description"], (first["series_number"], 0, name)))
        return sorted(units, key=lambda u: u.order)

    def decode(self, unit: _Unit) -> np.ndarray:
        """One unit -> preprocessed [1, *image_size] through the cache; DicomError on any failure."""
        try:
            return self._decode(unit)
        except DicomError:
            raise
        except Exception as exc:  # noqa: BLE001 -- e.g. slice geometry that numpy cannot use: this unit's finding
            raise DicomError("decode_failed", f"assembling the input: {type(exc).__name__}: {clip(str(exc))}") from None

    def _decode(self, unit: _Unit) -> np.ndarray:
        if self.task.spatial_dims == 2:
            path = self.root / unit.files[0]

            def compute() -> np.ndarray:
                img = read_image(path, frame=0)  # a 2D task uses the first frame: the others are never decoded
                return _preprocessed(lambda: preprocess(img.pixels, self._spacing(img.spacing_mm), self.task))

            return self.cache.array(self.keys[unit.files[0]], compute)
        if self.task.hu_window is not None or self.task.crop != "center" or is_enhanced(self.headers, unit.files):
            files = list(unit.files)  # HU window, isotropic resampling, spine crop, enhanced CT: shared/volume.py
            from shared.volume import ct_input  # torch + MONAI: CT tasks only

            return self.cache.array(combined_key([self.keys[f] for f in files]),
                                    lambda: _preprocessed(lambda: ct_input(self.root, files, self.headers, self.task)))
        geometry = order_slices(self.headers, list(unit.files))  # header-only: cheap, never cached

        def compute_volume() -> np.ndarray:
            return _preprocessed(lambda: preprocess(read_volume(self.root, geometry), self._spacing(geometry.spacing_mm),
                                                    self.task))

        return self.cache.array(combined_key([self.keys[f] for f in unit.files]), compute_volume)

    def _spacing(self, spacing: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if self.task.spacing_mm is not None and spacing is None:
            raise DicomError("no_pixel_spacing", "no PixelSpacing/ImagerPixelSpacing, task.spacing_mm is set")
        return spacing

    def select(self, pid: str, files: list[str]) -> list[tuple[np.ndarray, str]]:
        """The inputs of one patient the task uses, decoded; failures and unused ones are issues."""
        task = self.task
        ordered = self.units(files)
        if task.image_select == "series_description":
            wanted = (task.series_description or "").casefold()
            matching = [u for u in ordered if wanted and wanted in u.description.casefold()]
            self.issues.extend(issue("image_not_selected", pid, u.name, f"series '{u.description}'", kept=True)
                               for u in ordered if u not in matching)
            if not matching:
                found = sorted({u.description for u in ordered})
                self.issues.append(issue("no_matching_series", pid, ", ".join(u.name for u in ordered),
                                         f"wanted a series description containing '{task.series_description}', found {found}"))
                return []
            ordered = matching
        chosen: list[tuple[np.ndarray, str]] = []
        for unit in ordered:
            note = self._note(unit)
            if chosen and task.image_select != "all":
                why = f"image_select={task.image_select}" + (f"; {note}" if note else "")
                if self.verify_all:  # `fedmsk check` decodes every image once, used or not
                    try:
                        self.decode(unit)
                    except DicomError as exc:
                        self.issues.append(issue(exc.reason, pid, unit.name, f"{exc.detail} (not selected: {why})", kept=True))
                        continue
                self.issues.append(issue("image_not_selected", pid, unit.name, why, kept=True))
                continue
            try:
                chosen.append((self.decode(unit), unit.name))
            except DicomError as exc:
                self.issues.append(issue(exc.reason, pid, unit.name, exc.detail + (f" ({note})" if note else "")))
                continue
            if note:
                self.issues.append(issue("no_meta_header", pid, unit.name, note, kept=True))
        return chosen

    def _note(self, unit: _Unit) -> str:
        """What the report must say about how a unit's files were read (e.g. without a meta header)."""
        notes = sorted({self.headers[f].get("note", "") for f in unit.files} - {""})
        return "; ".join(notes)


def _volume_key(task: TaskConfig) -> dict[str, Any]:
    """shared.volume.volume_key, imported only for a CT task (the module imports torch and MONAI)."""
    if task.modality != "ct3d":
        return {}
    from shared.volume import volume_key

    return volume_key(task)


def _preprocessed(work: Callable[[], np.ndarray]) -> np.ndarray:
    """Preprocessing failures (an image MONAI cannot resize) are the file's finding, cached as such."""
    try:
        return work()
    except DicomError:
        raise
    except Exception as exc:  # noqa: BLE001 -- one image must never stop the site
        raise DicomError("decode_failed", f"preprocessing: {type(exc).__name__}: {clip(str(exc))}") from None


def load_site(site_dir: str | Path, task: TaskConfig, progress: Progress | None = None, use_cache: bool = True,
              verify_all: bool = False, labelled_only: bool = True) -> SiteData:
    """Read, validate, link and decode one site; unusable records become issues, never exceptions.

    ``labelled_only=False`` (scoring new patients, `fedmsk predict`; `fedmsk check`; pretraining)
    keeps unlabelled patients too, with label -1; with True they are only counted (``unlabelled``).

    ``verify_all`` also decodes the images the task does not select (for `fedmsk check`), so a
    broken file is found before it is the one a changed image_select would pick.
    """
    root = Path(site_dir)
    loader = _Loader(root, task, progress, use_cache, verify_all)
    table = read_table(root / "clinical.csv", task)
    loader.issues.extend(table.issues)
    by_patient = loader.scan()
    masks = SiteMasks(root, task) if task.mask_labels else None  # optional masks/ folder: extra input channels

    reported = {i.patient_id for i in table.issues if i.patient_id}
    for pid, files in sorted(by_patient.items()):
        if table.problem:  # no row can be linked: the table's problem is the one finding, not one per image
            break
        if pid not in table.rows and pid not in reported:
            loader.issues.extend(issue("image_without_clinical_row", pid, rel, f"PatientID '{pid}' is not in clinical.csv")
                                 for rel in files)

    ids: list[str] = []
    images: list[np.ndarray] = []
    raw: list[np.ndarray] = []
    labels: list[int] = []
    sources: list[str] = []
    rows = list(table.rows.values())
    unlabelled = 0
    for n, row in enumerate(rows, start=1):
        if progress:
            progress("images", n, len(rows))
        if row.label is None and labelled_only:
            unlabelled += 1
            continue
        files = by_patient.get(row.patient_id)
        if not files:
            loader.issues.append(issue("patient_without_image", row.patient_id, f"clinical.csv:{row.line}",
                                       f"no readable DICOM with PatientID '{row.patient_id}'"))
            continue
        for array, rel in loader.select(row.patient_id, files):
            if masks is not None:
                array = np.concatenate([array, masks.channels(row.patient_id, loader.headers[rel])])
            ids.append(row.patient_id)
            images.append(array)
            raw.append(row.values)
            labels.append(-1 if row.label is None else row.label)
            sources.append(rel)

    if masks is not None:
        loader.issues.extend(masks.finish(set(table.rows)))
    size = tuple(task.image_size)
    return SiteData(
        name=root.name,
        root=root,
        patient_ids=ids,
        images=np.stack(images).astype(np.float32) if images else np.zeros((0, 1 + mask_channels(task), *size), np.float32),
        clinical_raw=np.stack(raw).astype(np.float32) if raw else np.zeros((0, len(task.columns)), np.float32),
        labels=np.asarray(labels, dtype=np.int64),
        issues=loader.issues,
        files=sources,
        headers=loader.headers,
        cache_note=loader.cache.disabled_reason,
        clinical_problem=table.problem,
        clinical_missing=table.missing,
        masks=dict(masks.counts) if masks is not None else {},
        unlabelled=unlabelled,
    )


def split_indices(labels: np.ndarray, split_cfg: SplitConfig, seed: int,
                  groups: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Stratified, seeded train/val/test row indices.

    Allocation is per class (round(n*val), round(n*test), the rest trains, at least one
    training member per class), so tiny classes never break it. With ``groups`` (patient ids)
    all rows of a patient land in the same split: several views of one patient never straddle
    train and test. Groups are taken in order of first appearance, so with one row per patient
    the result is the same with or without ``groups``: every caller gets the same test set.
    """
    labels = np.asarray(labels)
    group_of = [str(g) for g in groups] if groups is not None else [str(i) for i in range(len(labels))]
    group_label: dict[str, int] = {}
    for g, y in zip(group_of, labels):
        group_label.setdefault(g, int(y))
    rng = np.random.default_rng(seed)
    assigned: dict[str, str] = {}
    for cls in sorted(set(group_label.values())):
        members = [g for g, y in group_label.items() if y == cls]
        n = len(members)
        n_test = min(round(n * split_cfg.test), max(n - 1, 0))
        n_val = min(round(n * split_cfg.val), max(n - 1 - n_test, 0))
        for rank, i in enumerate(rng.permutation(n)):
            assigned[members[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return {name: np.array([i for i, g in enumerate(group_of) if assigned[g] == name], dtype=np.int64)
            for name in ("train", "val", "test")}


_LABEL_STREAM = 0x1AB31  # label_subset's random stream beside split_indices' (same seed, independent draws)


def label_subset(labels: np.ndarray, fraction: float, seed: int, groups: Sequence[str] | None = None) -> np.ndarray:
    """Positions (into ``labels``) of the training rows whose label supervised training uses.

    ``task.label_fraction``: per class, max(1, round(n * fraction)) patients keep their label, the
    first of one seeded permutation per class, so for one seed the 10 % patients are among the
    25 % ones (label-fraction tables compare nested subsets, not different draws). Groups
    (patient ids) keep a patient's rows together, as in ``split_indices``.
    """
    if fraction >= 1.0:
        return np.arange(len(labels), dtype=np.int64)
    group_of = [str(g) for g in groups] if groups is not None else [str(i) for i in range(len(labels))]
    group_label: dict[str, int] = {}
    for g, y in zip(group_of, labels):
        group_label.setdefault(g, int(y))
    rng = np.random.default_rng([seed, _LABEL_STREAM])
    kept: set[str] = set()
    for cls in sorted(set(group_label.values())):
        members = [g for g, y in group_label.items() if y == cls]
        k = max(1, round(len(members) * fraction))
        kept.update(members[i] for i in rng.permutation(len(members))[:k])
    return np.array([i for i, g in enumerate(group_of) if g in kept], dtype=np.int64)


def site_splits(site: SiteData, task: TaskConfig, seed: int) -> dict[str, np.ndarray]:
    """Row indices of train / val / test / unlabelled at one site.

    Only labelled rows are split (``split_indices`` over them in load order), so val and test are
    the same patients whether or not the site also holds unlabelled ones. ``task.label_fraction``
    then keeps the labels of that fraction of the training patients (``label_subset``); the other
    training patients join "unlabelled" (with the patients whose label is empty): supervised
    training never sees them, pretraining may. Val and test are never touched.
    """
    labelled = np.flatnonzero(site.labels >= 0)
    ids = [site.patient_ids[i] for i in labelled]
    split = {k: labelled[v] for k, v in split_indices(site.labels[labelled], task.split, seed, groups=ids).items()}
    train = split["train"]
    keep = train[label_subset(site.labels[train], task.label_fraction, seed, [site.patient_ids[i] for i in train])]
    split["unlabelled"] = np.sort(np.concatenate([np.flatnonzero(site.labels < 0), np.setdiff1d(train, keep)]))
    split["train"] = keep
    split["train_all"] = train  # every training patient, labelled or held back (the clinical scaler's rows)
    return split


def make_datasets(site: SiteData, task: TaskConfig, seed: int, *, private: bool = False,
                  unlabelled: bool = False) -> dict[str, torch.utils.data.Dataset]:
    """train/val/test datasets of {"image": [1,*size], "clinical": [n_clinical], "label": []}.

    The clinical scaler sees only the training rows (all training patients: their clinical values
    carry no label), or, with ``private`` (the site trains under DP), no rows at all: the task's
    reference values (ClinicalScaler.from_reference), so one patient's record never moves
    another's inputs. The training set alone is augmented (``task.augment_dad``: domain-adaptive
    denormalisation first, towards public or DP-released profiles, shared.dad). ``train`` holds the labelled training
    patients ``site_splits`` keeps (``task.label_fraction``); ``unlabelled=True`` adds an
    "unlabelled" set (label -1, not augmented) of the rest, for pretraining.
    """
    import torch
    from monai.data import Dataset as MonaiDataset
    from monai.transforms import Compose

    from shared.dad import dad_transform

    split = site_splits(site, task, seed)
    train_all = split.pop("train_all")
    scaler = ClinicalScaler(task)
    scaler = scaler.from_reference() if private else scaler.fit(site.clinical_raw[train_all])
    if not unlabelled:
        split.pop("unlabelled")
    features = torch.from_numpy(scaler.transform(site.clinical_raw))
    out: dict[str, torch.utils.data.Dataset] = {}
    for name, idx in split.items():
        items = [{"image": torch.from_numpy(site.images[i]), "clinical": features[i],
                  "label": torch.tensor(-1 if name == "unlabelled" else int(site.labels[i]), dtype=torch.long)} for i in idx]
        transform = train_augmentation(task, seed) if name == "train" and task.augment else None
        dad = dad_transform(task, site.name, seed) if transform is not None else None  # task.augment_dad (shared.dad)
        out[name] = MonaiDataset(items, transform=transform if dad is None else Compose([dad, transform]))
    return out
