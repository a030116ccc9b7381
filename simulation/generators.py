"""Task -> synthetic-federation generator: what `fedmsk synth` writes for ``cfg.task.name``.

Each task brings its own generator module (radiographs for sarcopenia, CT series for vertebral
fractures), so adding a task adds a registry entry here, never a branch in a shared loader.
A generator writes ``cfg.num_sites`` site folders + ``oracle.csv`` under ``cfg.data_root``,
counts its progress steps, and describes its sites for the CLI's summary table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shared.config import ConfigError, FedmskConfig
from simulation import synth, synth_chest, synth_ct
from simulation import synth_hand


@dataclass(frozen=True)
class Generator:
    what: str  # the progress bar's label
    write_federation: Callable[[FedmskConfig, Callable[[], None] | None], Path]
    total_steps: Callable[[FedmskConfig], int]
    describe: Callable[[FedmskConfig], tuple[list[str], list[list[str]]]]


def _describe_radiographs(cfg: FedmskConfig) -> tuple[list[str], list[list[str]]]:
    rows = [[sp.name, str(sp.patients), f"{sp.prevalence:.2f}",
             f"{sp.scanner.modality} {sp.scanner.photometric} {sp.scanner.bits_stored}-bit",
             f"{sp.scanner.spacing_mm} mm", f"{sp.missing_rate:.2f}", "/".join(sp.sex_spelling)]
            for sp in synth.site_specs(cfg)]
    return ["site", "patients", "prevalence", "scanner", "spacing", "missing", "sex"], rows


_RADIOGRAPHS = Generator("drawing radiographs", synth.write_federation, synth.total_steps, _describe_radiographs)
_CT = Generator("drawing CT series", synth_ct.write_federation, synth_ct.total_steps, synth_ct.describe)
_HAND = Generator("drawing hand radiographs", synth_hand.write_federation, synth_hand.total_steps, synth_hand.describe)
_CHEST = Generator("drawing chest radiographs", synth_chest.write_federation, synth_chest.total_steps, synth_chest.describe)

GENERATORS: dict[str, Generator] = {
    "sarcopenia": _RADIOGRAPHS,
    "vertebral_fracture": _CT,
    "vertebral_fracture_binary": _CT,  # same hospitals; the grade is mapped to yes/no at loading
    "osteoporosis_hand": _HAND,
    "osteoporosis_chest": _CHEST,
}


def generator_for(cfg: FedmskConfig) -> Generator:
    if cfg.task.name not in GENERATORS:
        raise ConfigError(f"no synthetic generator for task '{cfg.task.name}'; registered: {', '.join(sorted(GENERATORS))} "
                          f"(simulation/generators.py)")
    return GENERATORS[cfg.task.name]


def write_federation(cfg: FedmskConfig, advance: Callable[[], None] | None = None) -> Path:
    """Write the synthetic federation of ``cfg.task``'s generator under cfg.data_root."""
    return generator_for(cfg).write_federation(cfg, advance)
