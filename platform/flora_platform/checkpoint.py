"""Training checkpoints: the adapters, a small state file, and each rank's own training state.

    <dir>/state.json            {"step": 120, "adapters": ["python", "perl"], "world_size": 2, "base_eval": {...}}
    <dir>/adapters/<name>/      flora_config.json + adapter.safetensors
    <dir>/ranks/<r>.pt          rank r's optimizer state (under ZeRO its shard: the fp32 masters and
                                AdamW moments of its partition), lr scheduler and RNG states

Rank 0 writes the first two, every rank its own `ranks/<r>.pt`, all into one Ray Train
checkpoint. With the data position (`step`: each worker's data stream is a pure function of the
source, seed, rank and world size) this is everything a step depends on, so a resumed run
continues the uninterrupted one exactly. Checkpoints from before rank states existed hold only the first two; resuming from one
restarts the optimizer's moments from zero.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

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


def rank_state_path(directory: str | Path, rank: int) -> Path:
    return Path(directory) / "ranks" / f"{rank}.pt"


def save_rank_state(directory: str | Path, rank: int, state: dict) -> Path:
    """Write rank `rank`'s training state (tensors and plain Python objects) into the checkpoint."""
    path = rank_state_path(directory, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def load_rank_state(directory: str | Path, rank: int) -> dict | None:
    """Rank `rank`'s training state, or None for a checkpoint that holds the adapters only."""
    path = rank_state_path(directory, rank)
    if not path.exists():
        return None
    # DeepSpeed's optimizer state holds its own objects (loss scaler, slice mappings), which the
    # weights-only unpickler refuses; this file is one our own run wrote.
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_states() -> dict:
    """This process's random number generators: Python's, NumPy's, torch's (CPU and CUDA)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
