"""Config schema and composition.

Every CLI verb and both Flower apps get their settings here: Hydra composes the YAML tree
under ``configs/`` with the user's overrides, and the result is merged into the dataclass
schema below, so an unknown key or a wrong type is an error at start that names the key,
not a surprise at round 7. Values that need more than a type check are checked in
``validate``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(os.environ.get("FEDMSK_CONFIG_DIR", Path(__file__).resolve().parent.parent / "configs"))
# ${fedmsk.by_dp:${privacy.enabled},A,B}: A without DP, B under DP -- a preset's value tuned separately for each
# (configs/pretrain/ssl.yaml's public_variance); an override of the key itself replaces both
OmegaConf.register_new_resolver("fedmsk.by_dp", lambda enabled, off, on: on if enabled else off, replace=True)


DEFAULT_LR = 1e-3  # federation.lr when neither it nor model.lr is set


class ConfigError(ValueError):
    """A config value that fedmsk cannot run with; the message names the key and the fix."""


# Checks that need a registry owned by a package above this one (model and loss names, the DP safety
# of the aux loss, strategy settings). The owner registers its check when it is imported, so shared/
# imports nothing from client/ or server/, and composing a config for `fedmsk check` imports neither
# torch nor Flower. A verb that trains imports the owners before it composes
# (``cli.main.load_training_checks``), so a wrong name still stops it at compose time.
_CHECKS: list[Callable[[FedmskConfig], None]] = []


def register_check(check: Callable[[FedmskConfig], None]) -> Callable[[FedmskConfig], None]:
    """Add ``check`` (raises ConfigError) to what ``validate`` runs; idempotent, usable as a decorator."""
    if check not in _CHECKS:
        _CHECKS.append(check)
    return check


@dataclass
class ColumnSpec:
    """One clinical column as the task declares it."""

    name: str = MISSING
    kind: str = "float"  # float | int | category
    unit: str | None = None
    min: float | None = None
    max: float | None = None
    # accepted spelling (matched case-insensitively, trimmed) -> numeric code
    categories: dict[str, float] = field(default_factory=dict)
    required: bool = True
    # drop: leave the patient out; impute: training-split median; indicator: impute + a 0/1 column
    missing: str = "drop"
    feature: bool = True  # an input of the model (False: read, validated, reported, not learned from)
    # public reference values (a published population norm, never a site's own data): under DP
    # the clinical scaler centres and scales by them and imputes ref_mean (shared.clinical)
    ref_mean: float | None = None
    ref_sd: float | None = None


@dataclass
class SplitConfig:
    val: float = 0.2
    test: float = 0.2


@dataclass
class DadProfile:
    """A domain's intensity profile for domain-adaptive denormalisation (shared.dad): public (from config)
    or built by the server from the sites' DP-noised releases, never a site's raw statistics."""

    name: str = MISSING
    mean: float = MISSING  # mean intensity of the domain's preprocessed images, in [0, 1]
    std: float = MISSING  # mean within-image standard deviation
    source: str = "public"


@dataclass
class TaskConfig:
    name: str = MISSING
    modality: str = "xray2d"  # xray2d | ct3d
    spatial_dims: int = 2
    label_column: str = MISSING
    classes: list[int] = field(default_factory=lambda: [0, 1])
    class_names: list[str] = field(default_factory=list)
    image_size: list[int] = field(default_factory=lambda: [64, 64])
    spacing_mm: float | None = None
    image_select: str = "first"  # first | all | series_description
    series_description: str | None = None
    min_usable: int = 20  # usable *labelled* patients `fedmsk check` asks for
    # fraction (0, 1] of each site's training patients whose label supervised training uses (stratified,
    # the site's split seed; the rest act as unlabelled; val/test untouched): shared.sitedata.site_splits
    label_fraction: float = 1.0
    split: SplitConfig = field(default_factory=SplitConfig)
    augment: bool = True
    # domain-adaptive denormalisation in the training augmentation (shared.dad): none | public (task.dad_profiles
    # from config) | federated (profiles the server builds from the sites' DP-noised intensity releases)
    augment_dad: str = "none"
    dad_prob: float = 0.5  # share of training images re-styled each epoch
    dad_profiles: list[DadProfile] = field(default_factory=list)
    columns: list[ColumnSpec] = field(default_factory=list)
    # threshold of the reported ACC/F1/SEN/SPC/PRE, chosen on the validation split (binary tasks):
    # youden (max SEN + SPC - 1) | sensitivity (highest threshold reaching target_sensitivity) | fixed (0.5)
    operating_point: str = "youden"
    target_sensitivity: float = 0.8
    # raw label value in the CSV -> class (empty: the value is the class), e.g. Genant 0-3 -> fracture 0/1
    label_map: dict[int, int] = field(default_factory=dict)
    # CT volumes (shared/volume.py): HU window [low, high] scaled to [0, 1] (null: the volume's min/max),
    # and where the task.image_size box sits after resampling to spacing_mm: center | bone (bone-HU bounding box)
    hu_window: list[float] | None = None
    crop: str = "center"
    bone_hu: float = 250.0
    # segmentation labels of optional per-patient masks (shared/masks.py), in label-value order 1..K;
    # empty: the task reads no masks. Set: every input gets K+1 one-hot mask channels (zeros without a mask)
    mask_labels: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    name: str = "mmcl"
    width: int = 16
    stages: int = 3
    embed_dim: int = 64
    proj_dim: int = 32
    clinical_hidden: int = 32
    dropout: float = 0.1
    nonlocal_heads: int = 2
    aux_loss: str = "none"
    # the auxiliary loss the DP presets (configs/privacy/eps*.yaml) put in place of aux_loss: a
    # per-sample one (shared.losses.DP_SAFE_AUX); a model whose own loss is per-sample and needed
    # (segclass: segmentation) names itself here so a preset never swaps it out
    dp_aux_loss: str = "prototype"
    aux_weight: float = 0.0
    temperature: float = 0.2
    pretrained_path: str | None = None
    # which parameters train (client.trainer.apply_finetune): all | heads (the image/clinical encoders
    # stay as loaded, e.g. from `fedmsk pretrain-public`) | norm_heads (heads + the encoders' norm layers)
    finetune: str = "all"
    fusion: str = "attention"  # mmcl: attention (MM-CL's visual-clinical self-attention) | gate (ablation)
    lr: float | None = None  # the learning rate tuned for this model; federation.lr, when set, wins


@dataclass
class StrategyConfig:
    name: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    min_evaluate_nodes: int = 2
    min_available_nodes: int = 2
    round_timeout_s: float = 3600.0
    max_update_norm: float = 1000.0  # an update moving the model further is left out of the round
    # client-level DP (strategy=dp_fedavg): each site's whole update is clipped, the mean noised
    client_dp_epsilon: float = 8.0
    client_dp_delta: float = 1e-5
    client_dp_clip: float = 1.0
    # strategy-specific settings (server/strategy.py reads them; the YAML of each choice sets them)
    proximal_mu: float = 0.0  # fedprox: mu/2 * ||w - w_global||^2 at each site
    server_lr: float = 0.1  # fedadam / fedyogi: server learning rate (eta)
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    trim_beta: float = 0.2  # fedtrimmedavg: fraction cut at each end, per coordinate
    num_malicious: int = 0  # krum / multikrum: sites assumed to be byzantine
    num_selected: int = 1  # multikrum: updates averaged after selection
    # parameters that stay at each site and never travel ("@norm": every normalisation layer)
    local_params: list[str] = field(default_factory=list)
    exclude_after_rejections: int = 0  # a site rejected this many rounds in a row is dropped (0: never)


@dataclass
class PrivacyConfig:
    enabled: bool = False
    target_epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "prv"  # prv | rdp
    # released evaluation counts (val/test patients, outside DP-SGD's guarantee): none | laplace | gaussian
    release_noise: str = "none"
    release_epsilon: float = 0.5  # epsilon of one release (one split, one round) at delta
    release_budget: float = 10.0  # total epsilon per split; once spent the site stops answering for it
    # local training under DP-SGD (null: the run's federation.* value); chosen under DP on synthetic
    # federations (bench/bench_dp.py --sweep), never on a hospital's data
    optimizer: str | None = None  # adam | sgd
    lr: float | None = None
    batch_size: int | None = None  # expected Poisson batch (sample rate = batch_size / training patients)
    local_epochs: int | None = None


@dataclass
class FederationConfig:
    local_epochs: int = 1
    batch_size: int = 16
    lr: float | None = None  # null: the model's tuned model.lr (DEFAULT_LR when it has none)
    weight_decay: float = 1e-4
    optimizer: str = "adam"
    client_cpus: int = 1
    client_gpus: float = 0.0
    torch_threads: int = 1
    secure_aggregation: bool = False  # SecAgg+: the server only sees the sum of the sites' updates
    secagg_max_dropouts: int = 1  # sites that may drop out of a SecAgg+ round without losing it
    # the update a site sends (shared.compression): none (fp32 weights) | fp16 | int8 (deltas against
    # the global weights it received; the server decodes before validation and aggregation)
    compression: str = "none"
    # deployment: seconds between the ServerApp's pulls for the sites' replies (Flower's grid: 3 s; server/reply_poll.py)
    reply_poll_s: float = 0.2
    # decoded site splits a ClientApp process keeps between messages (client.site_cache), in MB; the
    # newest site is always kept, older ones go first (a Ray worker plays many sites)
    site_cache_mb: float = 64.0
    # fp32 | bf16 | fp16: autocast of the forward pass and loss (shared.precision); weights, optimizer
    # state and what travels stay fp32. fp16 needs a GradScaler and is refused under DP-SGD
    precision: str = "fp32"


@dataclass
class SimulationConfig:
    """`fedmsk simulate` only: where Flower's simulation engine runs its Ray workers."""

    # null: start a local Ray instance for the run; "host:port" (the GCS address `ray start --head`
    # prints) or "auto": run on that existing cluster (simulation.runner.check_ray_address)
    ray_address: str | None = None


@dataclass
class SiteConfig:
    name: str | None = None
    data_dir: str | None = None
    device: str | None = None


@dataclass
class PretrainConfig:
    """`fedmsk pretrain` (and any run whose run config sets it): the job trains encoders, not a classifier.

    Read by shared.ssl (objectives, heads) and client.pretrain (the site's data and evaluation).
    """

    objective: str = "none"  # none (supervised training) | ssl (two views of one image) | crossmodal (image <-> clinical)
    # ssl: simsiam (predictor + stop-gradient) | public (the views against the encoder's own embeddings of public
    # images) | bank (the views against fixed random vectors)
    ssl_loss: str = "simsiam"
    negatives: str = "bank"  # crossmodal: bank (fixed non-private, DP-safe) | batch (in-batch CLIP; refused under DP)
    # under DP: the most this pretraining run may spend at a site on its own (null: what is left of the site's
    # budget, as any run, leaving none for fine-tuning); the site's budget caps the total either way
    epsilon: float | None = None
    proj_dim: int = 64  # projection size the objective compares in
    temperature: float = 0.2  # bank / batch contrast
    # weight of a per-sample reconstruction term (each encoder's embedding decodes its own input, coarsely):
    # without it the negative-free and bank objectives collapse every patient to one embedding (measured)
    recon_weight: float = 1.0
    # ssl_loss=public: the public images' folder of site folders (e.g. `fedmsk synth seed=50 data_root=DIR`);
    # null: drawn by the task's own synthetic generator at bank_seed into the site's cache (no patient data)
    bank_root: str | None = None
    bank_size: int = 64  # public images in the bank
    bank_seed: int = 50  # the synthetic bank's generator seed (public, the same at every site)
    # weight of a VICReg variance + covariance term on the encoder's embeddings of the public bank: a public
    # gradient added after DP-SGD's clipping and noise (client.pretrain.PublicVariance); 0: off
    public_variance: float = 0.0
    # under DP, this job's own DP-SGD batch size and lr in place of the privacy preset's (null: the preset's, which
    # were chosen for fine-tuning's few steps); a site whose own policy file sets batch_size / lr keeps its own
    dp_batch_size: int | None = None
    dp_lr: float | None = None


@dataclass
class SynthConfig:
    patients_per_site: list[int] = field(default_factory=lambda: [180, 140, 100])
    prevalence: list[float] = field(default_factory=lambda: [0.3, 0.22, 0.38])
    image_size: int = 128
    missing_rate: list[float] = field(default_factory=lambda: [0.02, 0.1, 0.05])
    image_signal: float = 1.0  # weight of the image-only muscle term in the latent score
    clinical_signal: float = 1.0  # weight of what the clinical table explains
    unlabelled_fraction: float = 0.0  # share of each site's patients written with an empty label (for pretraining)


@dataclass
class FedmskConfig:
    seed: int = 0
    num_sites: int = 3
    rounds: int = 5
    data_root: str = "data/synthetic"
    run_dir: str | None = None
    resume: bool = False  # continue run_dir from its latest checkpoint (after a server crash)
    device: str = "auto"
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    site: SiteConfig = field(default_factory=SiteConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)


_CHOICES: dict[str, tuple[str, ...]] = {
    "task.modality": ("xray2d", "ct3d"),
    "task.image_select": ("first", "all", "series_description"),
    "task.crop": ("center", "bone"),
    "task.augment_dad": ("none", "public", "federated"),
    "privacy.accountant": ("prv", "rdp"),
    "task.operating_point": ("youden", "sensitivity", "fixed"),
    "model.fusion": ("attention", "gate"),
    "privacy.release_noise": ("none", "laplace", "gaussian"),
    "model.finetune": ("all", "heads", "norm_heads"),
    "federation.optimizer": ("adam", "sgd"),
    "federation.compression": ("none", "fp16", "int8"),
    "federation.precision": ("fp32", "bf16", "fp16"),
    "pretrain.objective": ("none", "ssl", "crossmodal"),
    "pretrain.ssl_loss": ("public", "simsiam", "bank"),
    "pretrain.negatives": ("bank", "batch"),
}
_COLUMN_KINDS = ("float", "int", "category")
_MISSING_POLICIES = ("drop", "impute", "indicator")


def _schema_merge(raw: Any, origin: str) -> FedmskConfig:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(FedmskConfig), raw)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:  # unknown key, wrong type, missing value
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(
            f"{origin}: invalid config key '{key}': {exc.msg if hasattr(exc, 'msg') else exc}. "
            f"Check the spelling against configs/ (see `fedmsk simulate --help`)."
        ) from None
    assert isinstance(cfg, FedmskConfig)
    if cfg.federation.lr is None:  # each model trains at the learning rate tuned for it
        cfg.federation.lr = cfg.model.lr if cfg.model.lr is not None else DEFAULT_LR
    validate(cfg)
    return cfg


def validate(cfg: FedmskConfig) -> None:
    """Check values whose type is right but whose meaning is not; raise ConfigError."""
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"config '{key}' is '{value}'; allowed: {', '.join(allowed)}")
    for check in _CHECKS:  # names and settings only their owners know (models, losses, strategies)
        check(cfg)
    if cfg.num_sites < 1 or cfg.rounds < 1:
        raise ConfigError("config 'num_sites' and 'rounds' must be at least 1")
    if not 0 < cfg.task.split.val + cfg.task.split.test < 1:
        raise ConfigError("config 'task.split': val + test must be between 0 and 1 (the rest trains)")
    if not 0.0 < cfg.task.label_fraction <= 1.0:
        raise ConfigError(f"config 'task.label_fraction' is {cfg.task.label_fraction}; use a fraction in (0, 1] of the "
                          f"training patients whose label is used (1 = all)")
    if not 0.0 <= cfg.task.dad_prob <= 1.0:
        raise ConfigError(f"config 'task.dad_prob' is {cfg.task.dad_prob}; use a probability in [0, 1]")
    for prof in cfg.task.dad_profiles:
        if not (0.0 <= prof.mean <= 1.0 and 0.0 < prof.std <= 0.5):
            raise ConfigError(f"config 'task.dad_profiles' entry '{prof.name}': mean must be in [0, 1] and std in (0, 0.5]")
    if cfg.task.augment_dad == "public" and not cfg.task.dad_profiles:
        raise ConfigError("config 'task.augment_dad' is 'public' but task.dad_profiles is empty; list public profiles "
                          "(name, mean, std) or use augment_dad=federated")
    if not 0.0 <= cfg.synth.unlabelled_fraction < 1.0:
        raise ConfigError(f"config 'synth.unlabelled_fraction' is {cfg.synth.unlabelled_fraction}; use a value in [0, 1)")
    if not 0.0 < cfg.task.target_sensitivity <= 1.0:
        raise ConfigError(f"config 'task.target_sensitivity' is {cfg.task.target_sensitivity}; use a value in (0, 1]")
    if len(cfg.task.classes) < 2:
        raise ConfigError("config 'task.classes' needs at least two classes")
    if len(cfg.task.image_size) != cfg.task.spatial_dims:
        raise ConfigError(
            f"config 'task.image_size' has {len(cfg.task.image_size)} values but task.spatial_dims is {cfg.task.spatial_dims}"
        )
    if set(cfg.task.label_map.values()) - set(cfg.task.classes):
        raise ConfigError(f"config 'task.label_map' maps to {sorted(set(cfg.task.label_map.values()))}, not all in task.classes {cfg.task.classes}")
    if cfg.task.hu_window is not None and (len(cfg.task.hu_window) != 2 or cfg.task.hu_window[0] >= cfg.task.hu_window[1]):
        raise ConfigError(f"config 'task.hu_window' is {cfg.task.hu_window}; give [low, high] in HU with low < high")
    names = [c.name for c in cfg.task.columns]
    if len(set(names)) != len(names):
        raise ConfigError(f"config 'task.columns' declares a column twice: {names}")
    for col in cfg.task.columns:
        where = f"config 'task.columns' entry '{col.name}'"
        if col.kind not in _COLUMN_KINDS:
            raise ConfigError(f"{where}: kind '{col.kind}' not one of {_COLUMN_KINDS}")
        if col.missing not in _MISSING_POLICIES:
            raise ConfigError(f"{where}: missing '{col.missing}' not one of {_MISSING_POLICIES}")
        if col.kind == "category" and not col.categories:
            raise ConfigError(f"{where}: a category column needs 'categories' (spelling -> code)")
        if col.min is not None and col.max is not None and col.min > col.max:
            raise ConfigError(f"{where}: min {col.min} is above max {col.max}")
    s = cfg.strategy
    for name in ("min_train_nodes", "min_evaluate_nodes", "min_available_nodes"):
        if getattr(s, name) < 1:
            raise ConfigError(f"config 'strategy.{name}' must be at least 1")
    if not (0 < s.fraction_train <= 1 and 0 <= s.fraction_evaluate <= 1):
        raise ConfigError("config 'strategy.fraction_train' must be in (0, 1] and fraction_evaluate in [0, 1]")
    f = cfg.federation
    if f.local_epochs < 1 or f.batch_size < 1 or f.lr <= 0:
        raise ConfigError("config 'federation': local_epochs and batch_size must be >= 1 and lr > 0")
    if f.site_cache_mb < 0:
        raise ConfigError(f"config 'federation.site_cache_mb' is {f.site_cache_mb}; use MB >= 0 (0 keeps only the newest site)")
    if f.precision == "fp16" and cfg.privacy.enabled:
        raise ConfigError("config 'federation.precision' is 'fp16' with privacy.enabled: fp16 needs a GradScaler, whose "
                          "loss scaling would be clipped and noised with the per-sample gradients; use precision=bf16 or fp32")
    if not 0 < f.reply_poll_s <= 60:
        raise ConfigError(f"config 'federation.reply_poll_s' is {f.reply_poll_s}; use seconds in (0, 60] (Flower's own grid: 3)")
    if f.secure_aggregation and f.compression != "none":
        raise ConfigError(
            f"config 'federation.compression' is '{f.compression}' but federation.secure_aggregation is on: SecAgg+ "
            f"quantises and masks the update itself, so it cannot carry a compressed one; set federation.compression=none"
        )
    p = cfg.privacy
    if p.enabled and (p.target_epsilon <= 0 or not 0 < p.delta < 1 or p.max_grad_norm <= 0):
        raise ConfigError("config 'privacy': target_epsilon and max_grad_norm must be > 0 and delta in (0, 1)")


def compose(overrides: list[str] | tuple[str, ...] = (), config_dir: Path | None = None) -> FedmskConfig:
    """Compose configs/config.yaml with Hydra overrides and validate the result."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException

    cdir = Path(config_dir or CONFIG_DIR).resolve()
    if not (cdir / "config.yaml").is_file():
        raise ConfigError(f"no config.yaml in {cdir}; set FEDMSK_CONFIG_DIR to the fedmsk configs/ folder")
    try:
        with initialize_config_dir(config_dir=str(cdir), version_base=None):
            raw = hydra_compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"config overrides {list(overrides)}: {exc}") from None
    return _schema_merge(raw, origin=f"{cdir}/config.yaml with overrides {list(overrides)}")


def to_yaml(cfg: FedmskConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(text: str, origin: str = "config") -> FedmskConfig:
    return _schema_merge(OmegaConf.create(text), origin=origin)


def load_yaml_file(path: str | Path, schema: type, what: str, fix: str):
    """Read an operator-owned YAML file into ``schema`` (a dataclass); unknown keys are errors."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist; {fix}")
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(p)))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{what} {p}: {exc}") from None
    assert isinstance(obj, schema)
    return obj


def load_site_file(path: str | Path) -> SiteConfig:
    """Read a hospital's own site config (a YAML file the operator owns)."""
    return load_yaml_file(path, SiteConfig, "site config", "pass the YAML file your coordinator's bundle contains")


def resolve_device(requested: str | None) -> str:
    """'auto' picks cuda when a GPU is present; an explicit cuda request without a GPU is an error."""
    import torch

    req = (requested or "auto").lower()
    if req == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if req.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{requested}' asked for but no CUDA GPU is visible; use device=cpu or device=auto")
    if req != "cpu" and not req.startswith("cuda"):
        raise ConfigError(f"device '{requested}' is not cpu, cuda, cuda:N or auto")
    return req
