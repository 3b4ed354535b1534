"""Training checkpoints' own parts, without Ray: the per-rank state file and the RNG states."""

import random

import numpy as np
import pytest
import torch

from flora_platform import checkpoint as ckpt
from flora_platform.config import ConfigError, TrainConfig


def draws() -> tuple:
    return random.random(), np.random.rand(), torch.rand(3)


def test_rng_states_restore_the_same_draws():
    torch.manual_seed(1)
    saved = ckpt.rng_states()
    before = draws()
    draws()  # the generators move on
    ckpt.set_rng_states(saved)
    after = draws()
    assert before[:2] == after[:2] and torch.equal(before[2], after[2])


def test_rank_state_round_trips_and_is_absent_from_adapters_only_checkpoints(tmp_path):
    assert ckpt.load_rank_state(tmp_path, 0) is None  # a checkpoint from before rank states
    state = {"step": 7, "window": torch.arange(4.0).view(2, 2), "rng": ckpt.rng_states()}
    ckpt.save_rank_state(tmp_path, 1, state)
    assert ckpt.load_rank_state(tmp_path, 0) is None
    loaded = ckpt.load_rank_state(tmp_path, 1)
    assert loaded["step"] == 7 and torch.equal(loaded["window"], state["window"])


def test_checkpoint_interval_defaults_to_the_eval_interval():
    assert TrainConfig(eval_interval=10).checkpoint_every == 10
    assert TrainConfig(eval_interval=10, checkpoint_interval=7).checkpoint_every == 7
    with pytest.raises(ConfigError, match=r"train\.checkpoint_interval: must be >= 0"):
        TrainConfig(checkpoint_interval=-1)
