"""Adapters-only training checkpoints: one flora adapter directory per adapter plus a small state file.

    <dir>/state.json            {"step": 120, "adapters": ["python", "perl"], "base_eval": {...}}
    <dir>/adapters/<name>/      flora_config.json + adapter.safetensors
"""

from __future__ import annotations

import json
from pathlib import Path

import flora

STATE_NAME = "state.json"


def save_checkpoint(directory: str | Path, banks: flora.AdapterBanks, names: list[str], state: dict) -> Path:
    directory = Path(directory)
    for name in names:
        banks.export(name).save(directory / "adapters" / name)
    (directory / STATE_NAME).write_text(json.dumps({**state, "adapters": names}, indent=2) + "\n")
    return directory


def read_state(directory: str | Path) -> dict:
    return json.loads((Path(directory) / STATE_NAME).read_text())


def adapter_dir(directory: str | Path, name: str) -> Path:
    return Path(directory) / "adapters" / name


def load_checkpoint(directory: str | Path, banks: flora.AdapterBanks) -> dict:
    """Load every adapter of the checkpoint into `banks` (same names); return its state."""
    state = read_state(directory)
    for name in state["adapters"]:
        banks.load(name, flora.load_adapter(adapter_dir(directory, name)))
    return state
