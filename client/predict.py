"""`fedmsk predict <export> <site_dir>`: score a hospital's new patients with an exported model.

The intake is the one training and `fedmsk check` use (``shared.sitedata.load_site``: the same
DICOM reading, linking, preprocessing and cache), except that unlabelled patients are kept:
new patients have no label yet. Unusable records are listed with file, reason and what to do
in ``fedmsk-predict-report.csv``, as `fedmsk check` lists them. Clinical inputs are scaled by
the task's reference values (``ClinicalScaler.from_reference``): scores must not depend on which
other patients are in the folder. Nothing leaves the hospital.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from client.check import write_report

PREDICTIONS_NAME = "fedmsk-predictions.csv"
REPORT_NAME = "fedmsk-predict-report.csv"


@dataclass
class PredictResult:
    predictions: Path
    report: Path
    scored: int
    unusable: int


def class_labels(cfg) -> list[str]:
    names = list(cfg.task.class_names)
    return names if len(names) == len(cfg.task.classes) else [str(c) for c in cfg.task.classes]


def decide(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """Predicted class index: binary at the run's operating threshold (0.5 when none), else argmax."""
    if probs.shape[1] == 2:
        return (probs[:, 1] >= (0.5 if threshold is None else threshold)).astype(int)
    return probs.argmax(axis=1)


@torch.no_grad()
def score(model, images: np.ndarray, features: np.ndarray, device: str = "cpu", batch_size: int = 64) -> np.ndarray:
    model.to(device)
    out = [model(torch.from_numpy(images[i:i + batch_size]).to(device), torch.from_numpy(features[i:i + batch_size]).to(device)).cpu().numpy()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 2), np.float32)


def predict_site(export_dir: str | Path, site_dir: str | Path, out: str | Path | None = None, device: str = "cpu") -> PredictResult:
    from server.export import load_export
    from shared.clinical import ClinicalScaler
    from shared.sitedata import load_site

    cfg, model, card = load_export(export_dir)
    site_dir = Path(site_dir)
    site = load_site(site_dir, cfg.task, labelled_only=False)
    features = ClinicalScaler(cfg.task).from_reference().transform(site.clinical_raw).astype(np.float32)
    probs = score(model, site.images, features, device)
    threshold = (card.get("operating_point") or {}).get("threshold")
    predicted = decide(probs, threshold) if len(probs) else np.zeros(0, int)
    labels = class_labels(cfg)
    out_path = Path(out) if out else site_dir / PREDICTIONS_NAME
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["patient_id", "file", "label", *[f"p_{name}" for name in labels], "predicted"])
        for i, pid in enumerate(site.patient_ids):
            label = "" if site.labels[i] < 0 else labels[cfg.task.classes.index(int(site.labels[i]))]
            writer.writerow([pid, site.files[i], label, *[f"{p:.6f}" for p in probs[i]], labels[predicted[i]]])
    report = out_path.with_name(REPORT_NAME)
    write_report(site.issues, report)
    unusable = sum(1 for i in site.issues if not i.kept)
    return PredictResult(out_path, report, len(site.patient_ids), unusable)
