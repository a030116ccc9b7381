"""Where a model's starting weights came from: the card `fedmsk pretrain-public` writes beside them.

The model card of a run and each site's privacy ledger repeat it, so a reader knows which data
were public (the pretraining sites) and which were private (each hospital's training split).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

CARD = "encoder_card.json"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def provenance(pretrained_path: str | None) -> dict[str, Any] | None:
    """The card of the public weights a model starts from (None for random init), hash checked."""
    if not pretrained_path:
        return None
    weights = Path(pretrained_path)
    digest = sha256_of(weights) if weights.is_file() else None
    card_path = weights.with_name(CARD)
    if not card_path.is_file():
        return {"weights": str(weights), "sha256": digest, "data": "unknown: no encoder_card.json beside the weights"}
    card = json.loads(card_path.read_text())
    card["sha256_matches"] = card.get("sha256") == digest
    return card


def init_line(pretrained_path: str | None, finetune: str) -> str:
    """One line for a ledger: random init, or the public weights (hash) and what was fine-tuned."""
    card = provenance(pretrained_path)
    if card is None:
        return "random init"
    return f"public weights sha256={card.get('sha256')} ({card.get('data', '')}), finetune={finetune}"
