"""Config composition: the real configs/ tree, overrides, and errors that name the key."""

import pytest

from shared.config import ConfigError, compose, from_yaml, to_yaml


def test_defaults_compose_to_the_sarcopenia_mmcl_run():
    cfg = compose()
    assert cfg.task.name == "sarcopenia" and cfg.model.name == "mmcl" and cfg.strategy.name == "fedavg"
    assert [c.name for c in cfg.task.columns][:5] == ["age", "sex", "height_cm", "weight_kg", "bmi"]


def test_group_and_value_overrides_apply():
    cfg = compose(["num_sites=5", "rounds=10", "model=image_only", "federation.lr=0.01"])
    assert (cfg.num_sites, cfg.rounds, cfg.model.name, cfg.federation.lr) == (5, 10, "image_only", 0.01)


@pytest.mark.parametrize(
    "override, named",
    [
        ("rounds_typo=3", "rounds_typo"),
        ("+federation.bogus=1", "bogus"),
        ("rounds=many", "rounds"),
        ("model=nonexistent", "model"),
        ("federation.optimizer=lbfgs", "federation.optimizer"),
        ("model.aux_loss=triplet", "model.aux_loss"),
        ("task.split.val=0.9", "task.split"),
    ],
)
def test_wrong_key_or_value_is_an_error_naming_it(override, named):
    with pytest.raises(ConfigError) as err:
        compose([override])
    assert named in str(err.value)


def test_yaml_round_trip_is_lossless():
    cfg = compose(["model=late_fusion", "seed=7"])
    assert from_yaml(to_yaml(cfg)) == cfg


def test_batch_coupled_contrast_with_dp_is_refused_at_start_naming_the_safe_loss():
    with pytest.raises(ConfigError) as err:
        compose(["privacy.enabled=true", "model.aux_loss=supcon"])
    assert "prototype" in str(err.value)
    assert compose(["privacy.enabled=true", "model.aux_loss=prototype"]).privacy.enabled
