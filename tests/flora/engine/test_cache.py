"""`BatchKV` against independent references: its mask against the written semantics, and rows
moved between batches (chunked prefill, left padding, retiring and joining rows) against a
plain full-sequence forward of each row alone, without any cache."""

from __future__ import annotations

import pytest
import torch

from flora.engine.cache import BatchKV, attention_mask
from tests.flora.engine.reference import ARCHS, random_prompts, tiny_decoder


def test_attention_mask_semantics():
    gen = torch.Generator().manual_seed(0)
    valid = torch.rand(3, 9, generator=gen) > 0.4  # [B, K] with holes anywhere
    window = 4
    mask = attention_mask(valid, window, torch.float32)
    assert mask.shape == (3, 1, window, 9)
    for b in range(3):
        for q in range(window):
            col = 9 - window + q
            for k in range(9):
                allowed = (bool(valid[b, k]) and k <= col) or k == col
                assert (mask[b, 0, q, k] == 0) == allowed, (b, q, k)
    assert mask.min() == torch.finfo(torch.float32).min


def _forward(model, kv: BatchKV, chunks):
    with torch.no_grad():
        logits = model(**kv.prepare(chunks, torch.float32), past_key_values=kv, use_cache=True).logits
    kv.commit()
    return logits[:, -1]


def _alone(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_moved_between_batches_compute_what_they_would_alone(arch):
    model = tiny_decoder(arch)
    layers = model.config.num_hidden_layers
    seqs = random_prompts([11, 3, 17, 6], seed=3)

    # Prefill the first three rows together in chunks of at most 5 (rows of different lengths,
    # so windows have left padding and rows get holes), then take the rows out.
    kv = BatchKV.from_rows([None, None, None], layers, "cpu")
    done = [0, 0, 0]
    while any(d < len(s) for d, s in zip(done, seqs)):
        chunks = [s[d : d + 5] for d, s in zip(done, seqs)]
        logits = _forward(model, kv, chunks)
        for i, c in enumerate(chunks):
            done[i] += len(c)
            if c and done[i] == len(seqs[i]):
                torch.testing.assert_close(logits[i], _alone(model, seqs[i]), rtol=1e-4, atol=1e-4)
    rows = [kv.row(i) for i in range(3)]
    assert [r.length for r in rows] == [11, 3, 17]

    # A decode batch: rows right-aligned (left padded); decode two tokens each.
    batch = BatchKV(layers, 0, "cpu")
    batch.extend(rows[:2])
    batch.extend([rows[2]])  # longer than the batch: the others get more left padding
    tokens = [s[:] for s in seqs[:3]]
    for step in range(2):
        nxt = [[5 + step + i] for i in range(3)]
        logits = _forward(model, batch, nxt)
        for i in range(3):
            tokens[i] += nxt[i]
            torch.testing.assert_close(logits[i], _alone(model, tokens[i]), rtol=1e-4, atol=1e-4)

    # Retire the middle row, add a fresh one prefilled alone, decode again.
    batch.select([2, 0])
    fresh = BatchKV.from_rows([None], layers, "cpu")
    _forward(model, fresh, [seqs[3]])
    batch.extend([fresh.row(0)])
    order = [2, 0, 3]
    tokens.append(seqs[3][:])
    logits = _forward(model, batch, [[9], [10], [11]])
    for j, i in enumerate(order):
        tokens[i] += [9 + j]
        torch.testing.assert_close(logits[j], _alone(model, tokens[i]), rtol=1e-4, atol=1e-4)
    assert batch.lengths.tolist() == [len(tokens[i]) for i in order]
    # Retiring the longest row drops the columns only it used.
    end_before = batch.end
    batch.select([1, 2])
    assert batch.end == end_before - (len(tokens[2]) - max(len(tokens[0]), len(tokens[3])))


def test_decoding_past_the_allocated_columns_grows_the_buffers():
    model = tiny_decoder("llama")
    kv = BatchKV.from_rows([None, None], model.config.num_hidden_layers, "cpu")
    seqs = random_prompts([2, 5], seed=4)
    _forward(model, kv, seqs)
    capacity = kv.layers[0].keys.shape[2]
    for t in range(capacity - kv.end + 3):
        logits = _forward(model, kv, [[3 + t % 50], [4 + t % 50]])
        seqs = [seqs[0] + [3 + t % 50], seqs[1] + [4 + t % 50]]
    assert kv.layers[0].keys.shape[2] > capacity
    for i in range(2):
        torch.testing.assert_close(logits[i], _alone(model, seqs[i]), rtol=1e-4, atol=1e-4)
