"""Config composition: the real configs/ tree, overrides, and errors that name the key."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import load_training_checks
from shared.config import ConfigError, compose, from_yaml, to_yaml

load_training_checks()  # model, loss and strategy checks are registered by their owners (as the training verbs do)
ROOT = Path(__file__).resolve().parent.parent


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


def test_shared_imports_nothing_above_it():
    """Imports run downhill: shared/ never imports client/, server/, simulation/ or cli/."""
    above = {"client", "server", "simulation", "cli"}
    for path in (ROOT / "shared").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not {n.split(".")[0] for n in names} & above, f"{path.relative_to(ROOT)} imports {names}"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_check_verb_imports_no_training_stack(tmp_path):
    """`fedmsk check` composes its config and reads a site without torch, MONAI, Opacus, Flower or matplotlib."""
    sys.path.insert(0, str(ROOT / "tests"))
    from dicom_factory import ramp, task_config, valid_row, write_site

    site = write_site(tmp_path / "s", [valid_row("p1"), valid_row("p2", label=1)], images={"p1": ramp(), "p2": ramp()})
    heavy = ("torch", "monai", "opacus", "flwr", "matplotlib")
    code = (f"import sys; from cli.main import main; rc = main(['check', {str(site)!r}, 'task.min_usable=2', "
            f"'task.image_size=[16,16]']); print('LOADED', [m for m in {heavy!r} if m in sys.modules]); sys.exit(rc)")
    from shared.sitedata import load_site

    load_site(site, task_config(image_size=[16, 16]))  # decodes and fills the site's cache (MONAI resizes)
    warm = _run(code)  # every image cached: nothing heavy is imported at all
    assert warm.returncode == 0, warm.stderr
    assert "LOADED []" in warm.stdout, warm.stdout[-300:]


def test_training_verbs_still_refuse_a_wrong_name_at_compose_time():
    done = _run("import sys; from cli.main import main; sys.exit(main(['central', 'model.aux_loss=triplet']))")
    assert done.returncode == 2 and "model.aux_loss" in done.stderr, done.stderr[-500:]


def test_dp_presets_swap_in_each_models_own_per_sample_loss() -> None:
    """A preset replaces MM-CL's aux loss by the prototype contrast but keeps segclass's segmentation
    loss (a preset that forced prototype on segclass stopped its build); the command line still wins."""
    assert compose(["privacy=eps8"]).model.aux_loss == "prototype"
    hand = compose(["privacy=eps1", "task=osteoporosis_hand", "model=segclass"])
    assert hand.privacy.enabled and hand.model.aux_loss == "segmentation"
    assert compose(["privacy=eps4", "model.aux_loss=views"]).model.aux_loss == "views"
