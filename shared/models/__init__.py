"""Model registry: every model is reachable from its name in ``cfg.model.name``.

``build_model(cfg)`` is the one way to make a model, on the server (initial global weights)
and at every site (the local copy), so both sides always build the same architecture from
the same config. Models take ``(image [B,1,*size], clinical [B,F])`` and return a dict with
``logits`` [B,C] plus the optional outputs the auxiliary loss reads (``z_image``,
``z_clinical``, ``proj``, ``proto_logits``) and deeply supervised branch logits
(``logits_<branch>``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from shared.config import ConfigError, FedmskConfig, register_check
from shared.models.clinical import ClinicalOnly, LogReg
from shared.models.fracture3d import Fracture3D
from shared.models.late_fusion import LateFusion
from shared.models.mmcl import MMCL, ImageOnly
from shared.models.segclass import SegClass
from shared.models.spec import ModelSpec
from shared.models.wavelet import WaveletFusion

MODELS: dict[str, Callable[[ModelSpec], nn.Module]] = {
    "mmcl": MMCL,
    "image_only": ImageOnly,
    "clinical_only": ClinicalOnly,
    "logreg": LogReg,
    "late_fusion": LateFusion,
    "fracture3d": Fracture3D,
    "segclass": SegClass,
    "wavelet_fusion": WaveletFusion,
}


def model_spec(cfg: FedmskConfig, n_clinical: int | None = None) -> ModelSpec:
    """Sizes from the task config (the clinical width comes from the task's feature columns)."""
    from shared.losses import AUX_LOSSES

    if cfg.model.name not in MODELS:
        raise ConfigError(f"config 'model.name' is '{cfg.model.name}'; registered models: {', '.join(sorted(MODELS))}")
    if cfg.model.aux_loss not in AUX_LOSSES:
        raise ConfigError(f"config 'model.aux_loss' is '{cfg.model.aux_loss}'; available: {', '.join(sorted(AUX_LOSSES))}")
    # with aux_weight 0 the aux heads would get no gradient (an unused parameter under Opacus)
    needs = AUX_LOSSES[cfg.model.aux_loss].needs if cfg.model.aux_weight > 0 else frozenset()
    provides: frozenset[str] = getattr(MODELS[cfg.model.name], "provides", frozenset())
    if not needs <= provides:
        usable = sorted(k for k, v in AUX_LOSSES.items() if v.needs <= provides)
        raise ConfigError(
            f"config 'model.aux_loss={cfg.model.aux_loss}' needs the model outputs {sorted(needs - provides)}, "
            f"which model '{cfg.model.name}' does not produce; with this model use model.aux_loss one of {usable}"
        )
    if n_clinical is None:
        from shared.clinical import feature_names

        n_clinical = len(feature_names(cfg.task))
    return ModelSpec(
        model=cfg.model,
        spatial_dims=cfg.task.spatial_dims,
        n_classes=len(cfg.task.classes),
        n_clinical=n_clinical,
        outputs=needs,
        mask_labels=tuple(cfg.task.mask_labels),
    )


def build_model(cfg: FedmskConfig, n_clinical: int | None = None) -> nn.Module:
    """Build ``cfg.model.name``: weights from ``cfg.model.pretrained_path`` if set, else seeded random init.

    The init is seeded by ``cfg.seed`` inside a forked RNG, so the server and every site get
    identical initial weights without disturbing anyone else's random stream.
    """
    spec = model_spec(cfg, n_clinical)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = MODELS[cfg.model.name](spec)
    if spec.mask_labels and not getattr(model, "reads_masks", False):
        model.register_forward_pre_hook(_image_channel_only)  # the mask channels are a training target, not an input
    if cfg.model.pretrained_path:
        load_pretrained(model, Path(cfg.model.pretrained_path), cfg.model.name)
    return model


def _image_channel_only(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: a model that does not read masks sees only the image channel (shared.masks)."""
    return (args[0][:, :1], *args[1:])


def load_pretrained(model: nn.Module, path: Path, name: str) -> None:
    """Load a local state_dict file into ``model``; any mismatch is a ConfigError naming the file."""
    where = f"config 'model.pretrained_path' = {path}"
    if not path.is_file():
        raise ConfigError(f"{where}: no such file; point it at a local .pt state_dict (nothing is downloaded)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; all mean "not a state_dict file"
        raise ConfigError(f"{where}: not a readable torch state_dict ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{where}: the file does not hold a state_dict (a dict of tensors); save model.state_dict()")
    own = model.state_dict()
    encoders = {k.split(".", 1)[0] for k in state}
    if encoders <= set(ENCODER_FILE_PREFIXES) and set(own) - set(state):  # an encoders file (`fedmsk pretrain`)
        state = encoder_state(model, state, where, name)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        detail = "; ".join(
            part
            for part in (
                f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}" if missing else "",
                f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}" if unexpected else "",
                f"shape mismatch {shapes[:5]}" if shapes else "",
            )
            if part
        )
        raise ConfigError(
            f"{where}: does not fit model '{name}' ({detail}); was it saved from the same model.name, width, "
            f"stages, embed_dim, aux_loss and task columns?"
        )
    model.load_state_dict(state)


ENCODER_FILE_PREFIXES = ("image", "clinical")  # what a `fedmsk pretrain` weights file holds (shared.ssl.ENCODER_NAMES)


def encoder_state(model: nn.Module, state: dict[str, torch.Tensor], where: str, name: str) -> dict[str, torch.Tensor]:
    """A full state_dict for ``model``: its own values, with the encoders the file holds replaced.

    A pretraining run keeps only the encoders; the task model's heads start from the seeded init.
    An encoder the model does not have (the clinical one in image_only) is left out; a file with
    none of the model's encoders is an error, and an encoder must fit exactly (names and shapes).
    """
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if k.split(".", 1)[0] in {n for n in ENCODER_FILE_PREFIXES if hasattr(model, n)}
            and getattr(model, k.split(".", 1)[0]) is not None}
    if not kept:
        raise ConfigError(f"{where}: the file holds the encoders {sorted({k.split('.', 1)[0] for k in state})}, none of "
                          f"which model '{name}' has")
    for prefix in {k.split(".", 1)[0] for k in kept}:
        theirs = {k for k in kept if k.startswith(prefix + ".")}
        mine = {k for k in own if k.startswith(prefix + ".")}
        if theirs != mine:
            raise ConfigError(f"{where}: its '{prefix}' encoder does not fit model '{name}' (missing "
                              f"{sorted(mine - theirs)[:5]}, unexpected {sorted(theirs - mine)[:5]}); pretrain with the "
                              f"same model.name, width, stages and embed_dim")
    return own | kept



@register_check
def _check_model_name(cfg: FedmskConfig) -> None:
    """At compose time, in every process that imports the models (shared.config.register_check)."""
    if cfg.model.name not in MODELS:
        raise ConfigError(f"config 'model.name' is '{cfg.model.name}'; registered models: {', '.join(sorted(MODELS))}")


__all__ = ["MODELS", "ModelSpec", "build_model", "load_pretrained", "model_spec"]
