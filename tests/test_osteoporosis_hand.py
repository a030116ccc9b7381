"""Hand-radiograph osteoporosis: optional masks in the site contract and `fedmsk check`, the
segclass model (per-sample under DP, no mask needed at inference), and a tiny federation that learns."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from client.check import check_site
from client.randomness import INSECURE_SEED_ENV
from client.trainer import build_screener
from server.federation import run_federation
from shared.config import ConfigError, compose
from shared.masks import read_label_map
from shared.sitedata import load_site, make_datasets
from simulation.evaluation import load_federation, load_screener, pooled_test_metrics
from simulation.generators import write_federation
from simulation.synth_hand import LABELS, mask_format, seg_dataset
from tests.inprocess_grid import InProcessGrid

TINY = ["task=osteoporosis_hand", "num_sites=2", "synth.patients_per_site=[60,50]", "synth.image_size=64",
        "task.image_size=[32,32]", "model=segclass", "model.width=8"]


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hand") / "fed"
    write_federation(compose(TINY + [f"data_root={root}"]))
    return root


def _report(site_dir: Path) -> list[dict[str, str]]:
    with (site_dir / "fedmsk-check-report.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_check_reports_masks_found_missing_broken_and_mismatched_by_file(fed: Path) -> None:
    task = compose(TINY).task
    site_dir = fed / "site_a"
    assert mask_format(0) == "png" and not (fed / "site_b" / "masks").exists()
    # a mask of a label the task does not know
    pid = next(p.stem for p in sorted((site_dir / "masks").glob("*.png")))
    bad = site_dir / "masks" / f"{pid}.png"
    labels = np.asarray(Image.open(bad)).copy()
    labels[0, 0] = 7
    Image.fromarray(labels).save(bad)
    out = io.StringIO()
    result = check_site(site_dir, task, console=Console(file=out, width=200), use_cache=False)
    assert result.ok
    rows = {r["reason"]: r for r in _report(site_dir) if r["reason"].startswith("mask")}
    assert rows["mask_bad_labels"]["file"] == f"masks/{pid}.png" and "[7]" in rows["mask_bad_labels"]["detail"]
    assert "64x64" in rows["mask_shape_mismatch"]["detail"] and "32x32" in rows["mask_shape_mismatch"]["detail"]
    assert rows["mask_shape_mismatch"]["file"].startswith("masks/") and rows["mask_shape_mismatch"]["action"]
    assert rows["mask_unreadable"]["used"] == "yes"  # the patient trains without the mask
    counts = result.summary["masks"]
    assert counts["unreadable"] == counts["shape_mismatch"] == counts["bad_labels"] == 1
    assert counts["found"] > 10 and counts["missing"] > 0
    assert sum(1 for r in _report(site_dir) if r["reason"] == "mask_missing") == counts["missing"]
    assert "masks" in out.getvalue() and "shape mismatch 1" in out.getvalue()
    # the masks that were read are aligned one-hot channels; patients without one have zeros
    site = result.site
    mask = site.images[:, 1:]
    annotated = mask.sum(axis=1).max(axis=(1, 2)) > 0.5
    assert annotated.sum() == counts["found"] and site.images.shape[1] == 1 + len(LABELS) + 1
    bone = mask[annotated][:, 1:].sum(axis=1) > 0.5
    assert site.images[annotated, 0][bone].mean() > site.images[annotated, 0][~bone].mean() + 0.1  # bones are bright


def test_dicom_seg_and_npy_masks_read_as_label_maps(tmp_path: Path, fed: Path) -> None:
    import pydicom

    image = pydicom.dcmread(next((fed / "site_a" / "images").glob("*.dcm")))
    labels = np.zeros((64, 64), np.int64)
    labels[2:10, 3:6], labels[12:20, 8:9], labels[25:30, 20:31] = 1, 2, 3
    seg_dataset(labels, image).save_as(tmp_path / "p.dcm", enforce_file_format=True)
    assert np.array_equal(read_label_map(tmp_path / "p.dcm", ["Radius", "ulna", "METACARPALS"]), labels)
    with pytest.raises(Exception, match="segment 'ulna' is none of"):
        read_label_map(tmp_path / "p.dcm", ["radius", "metacarpals"])
    np.save(tmp_path / "q.npy", labels.astype(np.float32))
    with pytest.raises(Exception, match="integers"):
        read_label_map(tmp_path / "q.npy", list(LABELS))


def _batch(site_dir: Path, n: int = 8) -> dict[str, torch.Tensor]:
    cfg = compose(TINY)
    train = make_datasets(load_site(site_dir, cfg.task, use_cache=False), cfg.task, cfg.seed)["train"]
    items = [train[i] for i in range(n)]
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in ("image", "clinical", "label")}


def test_site_without_masks_trains_the_classifier_alone(fed: Path) -> None:
    screener = build_screener(compose(TINY))
    for site, has_masks in (("site_b", False), ("site_a", True)):
        batch = _batch(fed / site)
        out = screener(batch["image"], batch["clinical"])
        loss, parts = screener.criterion(out, batch["label"])
        assert (parts["aux"] > 0) == has_masks, (site, parts)
        screener.zero_grad()
        loss.backward()
        seg_grad = sum(float(p.grad.abs().sum()) for p in screener.net.seg.parameters())
        cls_grad = sum(float(p.grad.abs().sum()) for p in screener.net.image.parameters())
        assert cls_grad > 0 and (seg_grad > 0) == has_masks  # no mask: the U-Net gets exactly no gradient


def test_per_sample_gradients_are_independent_and_the_mask_term_is_per_patient(fed: Path) -> None:
    from opacus import GradSampleModule

    batch = _batch(fed / "site_a")
    has = batch["image"][:, 1:].sum(1).flatten(1).amax(1) > 0.5
    assert has.any() and (~has).any()
    torch.manual_seed(0)
    screener = build_screener(compose(TINY))

    def grads(image: torch.Tensor) -> dict[str, torch.Tensor]:
        gsm = GradSampleModule(screener)
        torch.manual_seed(1)  # same dropout masks
        loss, _ = screener.criterion(gsm(image, batch["clinical"]), batch["label"])
        loss.backward()
        out = {n: p.grad_sample.detach().clone() for n, p in gsm.named_parameters() if p.grad_sample is not None}
        gsm.zero_grad(set_to_none=True)
        gsm._close()
        return out

    a = grads(batch["image"])
    j = int(torch.nonzero(has)[0])
    changed = batch["image"].clone()
    changed[j] = torch.roll(changed[j], shifts=5, dims=-1)  # another image and mask for patient j only
    b = grads(changed)
    others = [i for i in range(len(has)) if i != j]
    for name in a:
        assert torch.allclose(a[name][others], b[name][others], atol=1e-6), name
    assert any(not torch.allclose(a[n][j], b[n][j]) for n in a)
    seg = [n for n in a if ".seg." in n or ".decoders." in n]
    assert seg and all(float(a[n][~has].abs().sum()) == 0.0 for n in seg)  # no mask, no segmentation gradient


def test_inference_needs_no_mask_and_mask_channels_never_reach_the_layers(fed: Path) -> None:
    batch = _batch(fed / "site_a")
    image = batch["image"]
    for model in ("segclass", "image_only"):
        screener = build_screener(compose(TINY + [f"model={model}"])).eval()
        with torch.no_grad():
            full = screener(image, batch["clinical"])["logits"]
            plain = screener(image[:, :1], batch["clinical"])["logits"]  # a radiograph alone, as at a hospital
        assert torch.allclose(full, plain, atol=1e-6), model


def test_masks_on_a_3d_task_are_refused() -> None:
    with pytest.raises(ConfigError, match="mask_labels"):
        compose(["task=vertebral_fracture", "task.mask_labels=[vertebra]", "model=segclass"])


def test_a_small_hand_federation_learns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two hand sites (one with masks) on a strong-signal mix: segclass trained federatedly ranks the
    osteoporotic patients well above chance on the pooled test patients (0.81 here, 0.96 on CI's CPU:
    the float order differs; 0.69-0.90 over data seeds 0-2), oracle beside (0.96)."""
    monkeypatch.setenv(INSECURE_SEED_ENV, "hand-acceptance")  # repeatable site shuffles (tests only)
    strong = ["task=osteoporosis_hand", "model=segclass", "model.width=8", "num_sites=2", "synth.patients_per_site=[70]",
              "synth.prevalence=[0.4]", "synth.image_size=32", "synth.image_signal=2.0", "synth.clinical_signal=2.0",
              "task.image_size=[32,32]", "task.augment=false", "rounds=3", "federation.local_epochs=3",
              "federation.batch_size=16", "federation.lr=0.005", f"data_root={tmp_path / 'fed'}", f"run_dir={tmp_path / 'run'}"]
    cfg = compose(strong)
    write_federation(cfg)
    assert any((tmp_path / "fed" / s / "masks").is_dir() for s in ("site_a", "site_b"))
    arrays, _ = run_federation(InProcessGrid({100 + i: {"partition-id": i} for i in range(2)}), cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["site"] for r in rows if r["phase"] == "train" and r["site"] != "global"} == {"site_a", "site_b"}
    metrics = pooled_test_metrics(load_screener(cfg, arrays.to_torch_state_dict()), cfg, load_federation(cfg))
    assert metrics["auc"] > 0.65, metrics
    # the latent score the labels were drawn from, on the same 26 patients: a model can tie it on so few
    # (0.9625 both, on CI's CPU), not rank far better without seeing the labels
    assert metrics["oracle_auc"] is not None and metrics["auc"] <= metrics["oracle_auc"] + 0.05, metrics
