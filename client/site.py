"""Which hospital this ClientApp is, and its data, decided at the site.

The site's own settings win over the server's: the data folder, the device and the site's
name come from the SuperNode's node config (``--node-config``) or the operator's site YAML,
never from the server's message. In simulation the Flower node config only carries a
partition id, which picks the n-th site folder (sorted by name) of the run's data root.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.config import ConfigError, FedmskConfig, load_site_file, resolve_device

log = logging.getLogger("fedmsk.client")

# node_config keys a SuperNode is started with (see `fedmsk join`)
NODE_SITE_NAME = "site-name"
NODE_DATA_DIR = "data-dir"
NODE_SITE_CONFIG = "site-config"
NODE_DEVICE = "device"


@dataclass(frozen=True)
class SiteIdentity:
    name: str
    data_dir: Path
    device: str


def list_sites(data_root: str | Path) -> list[Path]:
    """Site folders of a federation root: every subfolder holding a clinical.csv, by name."""
    root = Path(data_root)
    if not root.is_dir():
        raise ConfigError(f"data_root '{root}' is not a folder; run `fedmsk synth` or point data_root at your site folders")
    sites = sorted(p for p in root.iterdir() if p.is_dir() and (p / "clinical.csv").is_file())
    if not sites:
        raise ConfigError(f"data_root '{root}' holds no site folder (a folder with clinical.csv)")
    return sites


def resolve_site(node_config: dict[str, Any], cfg: FedmskConfig) -> SiteIdentity:
    """The site this process serves: node config / site YAML first, then simulation partition."""
    site_cfg = cfg.site
    if NODE_SITE_CONFIG in node_config:
        site_cfg = load_site_file(str(node_config[NODE_SITE_CONFIG]))
    data_dir = node_config.get(NODE_DATA_DIR) or site_cfg.data_dir
    name = node_config.get(NODE_SITE_NAME) or site_cfg.name
    device = node_config.get(NODE_DEVICE) or site_cfg.device or cfg.device
    if data_dir is None:
        if "partition-id" not in node_config:
            raise ConfigError("this site has no data folder: start it with --node-config 'data-dir=\"/path\"' or a site config")
        sites = list_sites(cfg.data_root)
        pid = int(node_config["partition-id"])
        if pid >= len(sites):
            raise ConfigError(f"simulated node {pid} has no site folder: data_root '{cfg.data_root}' holds {len(sites)} sites")
        data_dir = sites[pid]
    data_dir = Path(data_dir)
    if cfg.site.data_dir and Path(cfg.site.data_dir) != data_dir:
        log.warning("server asked for data folder %s; the site uses its own: %s", cfg.site.data_dir, data_dir)
    return SiteIdentity(name=str(name or data_dir.name), data_dir=data_dir, device=resolve_device(device))
