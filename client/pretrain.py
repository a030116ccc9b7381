"""A site's side of a pretraining job (``pretrain.objective`` set in the run config).

The ClientApp trains and evaluates a pretraining job with the same loop, DP-SGD engine and
ledger as supervised training (``client.app``); what differs lives here:

- the data: every usable patient that is not a validation or test patient, labelled or not
  (empty label, or held back by ``task.label_fraction``); validation patients give the
  pretraining loss the server sees. Test patients are never touched, so a model fine-tuned
  from these weights is tested on patients its encoders never saw;
- the self-supervised views: two independently augmented copies of each image (MONAI
  transforms), drawn per patient so one patient's views depend on that image alone;
- the evaluation: the objective's mean loss on the validation patients, no labels needed;
- the public image bank of ``pretrain.ssl_loss=public`` (``public_bank``), loaded once with the
  site's datasets and handed to the model (``attach_bank``).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from client.privacy import NODE_PRIVACY_CONFIG, SitePrivacy, epsilon_of, load_policy_file
from client.proximal import after_noise
from client.randomness import site_seed
from shared.config import ConfigError, FederationConfig, FedmskConfig, TaskConfig
from shared.ssl import uses_image_bank


class TwoViews:
    """``{"image": [C, *size]}`` -> ``{"image": [2C, *size]}``: two independent random views, stacked on channels.

    SimCLR/SimSiam-style augmentations for grey-scale radiographs and CT (MONAI): random
    affine (rotation, shift, zoom, the "random resized crop" of natural images), a left-right
    flip, intensity scaling and gamma (scanner differences), blur and noise, clipped back to [0, 1].
    Stronger than the supervised ``train_augmentation``: the objective learns what stays the same.
    """

    def __init__(self, task: TaskConfig, seed: int) -> None:
        from monai.transforms import (Compose, EnsureType, Lambda, RandAdjustContrast, RandAffine, RandFlip,
                                      RandGaussianNoise, RandGaussianSmooth, RandScaleIntensity)

        dims = task.spatial_dims
        size = tuple(int(s) for s in task.image_size)
        self.augment = Compose([
            RandAffine(prob=0.9, rotate_range=(0.2,) * (1 if dims == 2 else 3), translate_range=tuple(0.1 * s for s in size),
                       scale_range=(0.25,) * dims, mode="bilinear", padding_mode="zeros", spatial_size=size, cache_grid=True),
            RandFlip(prob=0.5, spatial_axis=dims - 1),
            RandScaleIntensity(factors=0.25, prob=0.8),
            RandAdjustContrast(prob=0.5, gamma=(0.7, 1.5)),
            RandGaussianSmooth(prob=0.3, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0), sigma_z=(0.25, 1.0)),
            RandGaussianNoise(prob=0.5, std=0.04),
            Lambda(func=lambda x: x.clamp(0.0, 1.0)),
            EnsureType(track_meta=False, dtype=torch.float32),
        ])
        self.augment.set_random_state(seed=seed % 2**32)

    def __call__(self, item: dict) -> dict:
        image = item["image"]
        return item | {"image": torch.cat([self.augment(image), self.augment(image)], dim=0)}


def pretrain_datasets(data_dir: str, cfg: FedmskConfig, seed: int, private: bool) -> dict[str, Dataset]:
    """``train`` (every non-val/test patient, labelled or not) and ``val`` datasets for the objective.

    The labelled patients are split as supervised training splits them (``split_indices`` over
    the labelled rows in load order), so the validation and test patients are the same ones in
    both; every labelled training patient (whether or not ``task.label_fraction`` keeps its label
    for fine-tuning) and every unlabelled patient pretrains. Clinical scaling: the task's
    reference values under DP (one patient's record never moves another's input), else fitted on
    the pretraining patients. Raises when the site has nobody to pretrain on.
    """
    from monai.data import Dataset as MonaiDataset

    from shared.clinical import ClinicalScaler
    from shared.sitedata import load_site, split_indices
    from shared.transforms import train_augmentation

    task = cfg.task
    site = load_site(data_dir, task, labelled_only=False)
    labelled = np.flatnonzero(site.labels >= 0)  # split as supervised training splits them (labelled rows, load order)
    split = {k: labelled[v] for k, v in split_indices(site.labels[labelled], task.split, seed,
                                                      groups=[site.patient_ids[i] for i in labelled]).items()}
    train = np.sort(np.concatenate([split["train"], np.flatnonzero(site.labels < 0)]))
    if len(train) == 0:
        raise RuntimeError(f"site data {data_dir}: no usable patient to pretrain on ({len(site.issues)} records left out); "
                           f"run `fedmsk check {data_dir}` to see why")
    scaler = ClinicalScaler(task)
    scaler = scaler.from_reference() if private else scaler.fit(site.clinical_raw[train])
    features = torch.from_numpy(scaler.transform(site.clinical_raw))
    ssl = cfg.pretrain.objective == "ssl"
    out: dict[str, Dataset] = {}
    for name, idx in (("train", train), ("val", split["val"])):
        items = [{"image": torch.from_numpy(site.images[i]), "clinical": features[i],
                  "label": torch.tensor(int(site.labels[i]), dtype=torch.long)} for i in idx]  # -1: unlabelled
        if ssl:  # the training views from a site-secret stream; validation views repeatable (the loss compares rounds)
            transform = TwoViews(task, site_seed("views", data_dir) if name == "train" else seed)
        else:
            transform = train_augmentation(task, seed) if name == "train" and task.augment else None
        out[name] = MonaiDataset(items, transform=transform)
    out["test"] = MonaiDataset([])  # never read by pretraining (the split stays the fine-tuning test set)
    if uses_image_bank(cfg):
        out["bank"] = public_bank(cfg, data_dir)
    return out


def public_bank(cfg: FedmskConfig, data_dir: str) -> torch.Tensor:
    """The ``pretrain.ssl_loss=public`` negatives' images, ``[bank_size, C, *task.image_size]``, no patient in them.

    From ``pretrain.bank_root`` (a folder of public site folders, read with the task's own intake so
    they are preprocessed exactly as the site's images), or, when that is null, from the task's
    synthetic generator (`fedmsk synth`) at the public ``pretrain.bank_seed``, written once into the
    site's cache folder. The choice of images is a public permutation (bank_seed): every site of a
    run holds the same bank, and the server could compute it too.
    """
    from client.site import list_sites
    from shared.sitedata import load_site

    p = cfg.pretrain
    root = Path(p.bank_root) if p.bank_root else _synthetic_bank(cfg, Path(data_dir))
    if p.bank_root and not root.is_dir():
        raise ConfigError(f"config 'pretrain.bank_root' = {root} is not a folder; give a folder of public site folders "
                          f"(e.g. written by `fedmsk synth seed=50 data_root={root}`), or null for the synthetic bank")
    images = np.concatenate([load_site(folder, cfg.task, labelled_only=False).images for folder in list_sites(root)])
    if len(images) == 0:
        raise ConfigError(f"config 'pretrain.bank_root' = {root}: no usable image in its site folders; "
                          f"run `fedmsk check` on them")
    pick = np.random.default_rng(p.bank_seed).permutation(len(images))[: p.bank_size]
    # each public image as one augmented view (TwoViews' augmentations, public seed): the patient's two views are
    # compared with views, so the positive is not less alike than a negative from the first step (with clean
    # negatives it was, and collapsing the projection then lowered the loss to log(K + 1))
    augment = TwoViews(cfg.task, p.bank_seed).augment
    return torch.stack([augment(torch.from_numpy(images[i])) for i in np.sort(pick)])


def _synthetic_bank(cfg: FedmskConfig, site_dir: Path) -> Path:
    """``fedmsk synth`` of one public site at ``pretrain.bank_seed`` under the site's cache, written once per
    (task, synth settings, seed, size); a generator's own output, so no patient data."""
    from shared.cache import CACHE_DIRNAME
    from simulation.generators import write_federation

    p = cfg.pretrain
    n = max(10, math.ceil(p.bank_size * 1.25))  # a margin for the records a generator writes broken on purpose
    synth = replace(cfg.synth, patients_per_site=[n], unlabelled_fraction=0.0)
    key = hashlib.blake2b(json.dumps([cfg.task.name, str(synth), p.bank_seed], sort_keys=True).encode(),
                          digest_size=8).hexdigest()
    root = site_dir / CACHE_DIRNAME / "public-bank" / key
    if not root.is_dir():
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write_federation(replace(cfg, seed=p.bank_seed, num_sites=1, data_root=str(tmp), synth=synth))
        tmp.rename(root)
    return root


def attach_bank(screener: torch.nn.Module, datasets: dict) -> None:
    """Hand a pretraining job's public bank (``pretrain_datasets``) to its model; a no-op for every other job."""
    if "bank" in datasets:
        screener.net.set_bank(datasets["bank"])


@torch.no_grad()
def evaluate_pretrain(screener: torch.nn.Module, loader: DataLoader, device: str) -> dict[str, float]:
    """The objective's mean loss over ``loader`` (eval mode) and the number of patients: all a pretraining
    evaluation releases (no label, no per-patient value)."""
    screener.to(device).eval()
    total, seen = 0.0, 0
    for batch in loader:
        image, clinical = batch["image"].to(device), batch["clinical"].to(device)
        if image.shape[0] == 0:
            continue
        loss, _ = screener.criterion(screener(image, clinical), batch["label"].to(device))
        total += float(loss) * image.shape[0]
        seen += image.shape[0]
    return {"loss": total / seen if seen else float("nan"), "num-examples": seen}


def pretrain_training(fed: FederationConfig, cfg: FedmskConfig, node_config: dict, dp: bool) -> FederationConfig:
    """A pretraining job's local-training settings under DP: ``pretrain.dp_batch_size`` / ``dp_lr`` where set.

    Why its own: the privacy presets' batch 32 and lr 0.1 were chosen for fine-tuning's ~20 steps. A pretraining
    run on a hospital's unlabelled cohort takes many more, and at those settings DP-SGD's noise walked the encoder
    away (feature maps 30-100,000x, README "Label efficiency of pretraining"); a larger batch at the same epsilon
    puts less noise on each step's mean gradient. The values in configs/pretrain/*.yaml were chosen under DP on
    tuning federations (bench/bench_pretrain_lr.py). A site's own policy file that sets ``batch_size`` or ``lr``
    keeps them (a site's settings win over the run's). Supervised jobs and jobs without DP are unchanged.
    """
    p = cfg.pretrain
    if p.objective == "none" or not dp:
        return fed
    own = load_policy_file(str(node_config[NODE_PRIVACY_CONFIG])) if NODE_PRIVACY_CONFIG in node_config else None
    changes = {k: v for k, v in (("batch_size", p.dp_batch_size), ("lr", p.dp_lr))
               if v is not None and (own is None or getattr(own, k) is None)}
    return replace(fed, **changes) if changes else fed


def run_spend(privacy: SitePrivacy, run_id: str) -> float:
    """Epsilon of this run's own steps at the site (its rounds in the ledger), by the site's accountant.

    The ``epsilon`` a site reports is its ledger total over every run; a pretrained model's card
    needs what the pretraining itself cost, which a fine-tuned model's card adds to its own
    (shared.provenance.compose_privacy). A function of the noise plan and step count only, like
    ``epsilon``: nothing about a patient.
    """
    steps = [(r.noise_multiplier, r.sample_rate, r.steps) for r in privacy.ledger.rounds if r.run_id == run_id]
    return epsilon_of(steps, privacy.policy.delta, privacy.policy.accountant)


class PublicVariance:
    """``pretrain.public_variance``: the VICReg variance/covariance gradient of the public bank's embeddings,
    added to the update after DP-SGD has clipped and noised the patients' gradients (as client.proximal).

    Why outside the clipping: the term reads the weights and public images only, so it is not any
    patient's gradient; inside the loss it would enter every per-sample gradient, be clipped with it,
    and (worse) its forward pass over K public images would be recorded by Opacus' hooks as if they
    were patients. Added to the noisy gradient it costs no privacy (a function of the current weights,
    already a DP release, and of public data: post-processing). Why it is needed: without batch
    statistics nothing in SimSiam or a detached bank pushes embeddings apart, and they collapsed to
    ~2 effective directions (bench/bench_pretrain_probe.py); this term spreads the public images'
    embeddings, and the encoder the hospitals' images with them.
    """

    def __init__(self, screener: torch.nn.Module, weight: float) -> None:
        self.net, self.weight = screener.net, float(weight)
        self.params = [p for p in screener.parameters() if p.requires_grad]

    def add_gradient(self, module: torch.nn.Module) -> None:
        hooked = hasattr(module, "disable_hooks")  # Opacus' GradSampleModule: these are no patients' activations
        if hooked:
            module.disable_hooks()
        try:
            with torch.enable_grad():
                loss = self.weight * self.net.public_variance_loss()
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        finally:
            if hooked:
                module.enable_hooks()
        with torch.no_grad():
            for p, g in zip(self.params, grads):
                if g is not None:
                    p.grad = g.clone() if p.grad is None else p.grad.add_(g)

    def attach(self, optimizer: torch.optim.Optimizer, module: torch.nn.Module):
        """Before every real update of ``optimizer`` (Opacus': its inner optimizer, after clipping and noise)."""
        return after_noise(optimizer, lambda: self.add_gradient(module))
