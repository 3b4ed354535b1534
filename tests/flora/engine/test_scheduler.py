"""The scheduler's plans over the block pool: token budget, row limit, chunked prefill, FIFO,
adapters loading or waiting for a slot, preemption when the pool runs short, prefix reuse keyed
by adapter; and the block manager's accounting."""

from __future__ import annotations

import random

import numpy as np
import pytest

from flora.engine.batch import BatchState
from flora.engine.kv_cache import BlockManager, block_digest
from flora.engine.request import Request, RequestHandle
from flora.engine.scheduler import Admission, Scheduler, Sequence

BS = 4
SLOTS = {None: 0, "a": 1, "b": 2}  # adapter name -> the slot a harness pins for it (others: 7)


def seq(n: int, prompt, adapter: str | None = None, max_new: int = 16) -> Sequence:
    tokens = list(prompt) if not isinstance(prompt, int) else [5 + (n + i) % 90 for i in range(prompt)]
    request = Request(tokens, adapter=adapter, max_new_tokens=max_new)
    return Sequence(request, RequestHandle(request), n, 0.0, frozenset(), seed=n, tokens=list(tokens), num_prompt=len(tokens))


class Harness:
    """A scheduler over `rows` rows and `blocks` blocks; `status` decides each adapter's admission,
    `keys` each slot's adapter load id. `step()` pretends the model ran the plan."""

    def __init__(self, rows=8, tokens=64, blocks=64, max_len=256, status=None, keys=None):
        self.batch = BatchState(rows, max_len, BS)
        self.blocks = BlockManager(blocks, BS)
        self.status = status or {}
        self.keys = keys or {}
        self.pins = []
        self.scheduler = Scheduler(self.batch, self.blocks, tokens, admit=self.admit, release=self.release,
                                   adapter_key=lambda slot: self.keys.get(slot, 0))

    def admit(self, s):
        status = self.status.get(s.request.adapter, Admission.READY)
        if status is Admission.READY:
            s.slot = SLOTS.get(s.request.adapter, 7)
            self.pins.append(s)
        return status

    def release(self, s):
        self.pins.remove(s)
        s.slot = None

    def add(self, *seqs):
        for s in seqs:
            self.scheduler.add(s)

    def step(self):
        plan = self.scheduler.schedule()
        if plan is None:
            return None
        inputs = self.batch.inputs(plan)
        tokens = np.full(len(inputs.sample_rows), 7)
        done = self.batch.advance(plan, inputs.sample_rows, tokens, now=0.0)
        self.scheduler.register_full_blocks(plan)
        for row in inputs.sample_rows[done.length]:
            self.scheduler.finish(self.batch.seqs[row])
        return [(self.batch.seqs[r] if self.batch.seqs[r] else None, int(n)) for r, n in zip(plan.rows, plan.counts)], plan


def test_long_prompt_is_chunked_while_rows_decode():
    h = Harness(tokens=10)
    a, b = seq(0, 3), seq(1, 3)
    h.add(a, b)
    h.step()  # both prompts in one step (6 tokens)
    long, short = seq(2, 30), seq(3, 3)
    h.add(long, short)
    chunks, plan = h.step()  # 2 decode tokens, then the oldest waiting request takes the rest
    assert [(s, n) for s, n in chunks] == [(a, 1), (b, 1), (long, 8)]
    assert list(h.scheduler.waiting) == [short]
    for expected in (8, 8, 6):  # the long prompt goes on in chunks; the short one waits its turn
        chunks, _ = h.step()
        assert (long, expected) in chunks
        assert short not in [s for s, _ in chunks] or expected == 6
    assert plan.num_single == 2


def test_row_limit_and_budget():
    h = Harness(rows=3, tokens=100)
    seqs = [seq(i, 2) for i in range(5)]
    h.add(*seqs)
    chunks, _ = h.step()
    assert [s for s, _ in chunks] == seqs[:3] and len(h.scheduler.waiting) == 2
    chunks, _ = h.step()
    assert sorted(n for _, n in chunks) == [1, 1, 1]  # three rows decode; nobody else fits


def test_loading_adapters_wait_without_blocking_and_blocked_slots_stop_admission():
    status = {"loading": Admission.WAIT, "no-slot": Admission.BLOCKED, "broken": Admission.FAILED}
    h = Harness(status=status)
    a, failed, b, c, d = seq(0, 4, "loading"), seq(4, 4, "broken"), seq(1, 4, "x"), seq(2, 4, "no-slot"), seq(3, 4, "y")
    h.add(a, failed, b, c, d)
    chunks, _ = h.step()
    # `a` waits for its load without holding up `b`; `c` needs a slot that only finishing
    # requests can free, so `d` (younger) is not admitted past it: it cannot starve `c`.
    assert [s for s, _ in chunks] == [b]
    assert list(h.scheduler.waiting) == [a, c, d]  # `failed` was dropped (the engine ended it)
    status["loading"] = status["no-slot"] = Admission.READY
    chunks, _ = h.step()
    assert [s for s, _ in chunks] == [b, a, c, d]  # b decodes; the rest in arrival order


def test_a_short_pool_preempts_the_newest_row_which_resumes_from_the_prefix_cache():
    # 8 usable blocks of 4 tokens: three 8-token prompts take 6; their 9th tokens need a third
    # block each, and only 2 are free: one row must yield.
    h = Harness(rows=4, tokens=64, blocks=9, max_len=33)
    seqs = [seq(i, 8, max_new=9) for i in range(3)]
    h.add(*seqs)
    h.step()
    assert h.blocks.free_blocks == 2
    h.step()  # each row computes its 9th token
    preempted = [s for s in seqs if s.preemptions]
    assert preempted == [seqs[2]] and h.scheduler.waiting[0] is seqs[2]  # the newest, at the front
    assert len(seqs[2].tokens) == 9  # its prompt and the token it drew go with it
    hits_before = h.blocks.hits
    while h.batch.running or h.scheduler.waiting:
        h.step()
    assert h.blocks.hits > hits_before  # re-admitted from its cached full blocks
    assert h.blocks.free_blocks == h.blocks.usable_blocks and not h.pins  # nothing leaked


def test_prefix_reuse_is_keyed_by_adapter_load():
    h = Harness(keys={0: 0, 1: 101, 2: 102})
    prompt = list(range(10, 23))  # 13 tokens: 3 full blocks
    first = seq(0, prompt, "a")
    h.add(first)
    h.step()
    assert h.blocks.hits == 0
    same, other, base = seq(1, prompt, "a"), seq(2, prompt, "b"), seq(3, prompt)
    h.add(same, other, base)
    h.step()
    assert h.blocks.hits == 3  # the same adapter load: three blocks shared ...
    rows = {s: s.row for s in (first, same, other, base)}
    assert h.batch.blocks(rows[same])[:3] == h.batch.blocks(rows[first])[:3]
    for s in (other, base):  # ... other adapters (and the base model) share nothing
        assert not set(h.batch.blocks(rows[s])) & set(h.batch.blocks(rows[first]))
    assert int(h.batch.num_computed[rows[same]]) == 13  # 12 from the cache, the 13th computed


def test_the_last_prompt_token_is_always_computed():
    h = Harness()
    prompt = list(range(10, 18))  # exactly two full blocks
    h.add(seq(0, prompt))
    h.step()
    again = seq(1, prompt)
    h.add(again)
    chunks, _ = h.step()
    assert h.blocks.hits == 1 and (again, 4) in chunks  # block 2 holds the last token: recomputed


def test_block_manager_reference_counts_and_lru_eviction():
    bm = BlockManager(5, BS)
    assert bm.free_blocks == 4 and bm.usable_blocks == 4
    a = bm.allocate(2)
    d = [block_digest(b"", 0, [1, 2, 3, 4]), block_digest(b"x", 0, [5, 6, 7, 8])]
    for block, digest in zip(a, d):
        bm.register(block, digest)
    assert bm.match(d) == a and all(bm.refcount(b) == 2 for b in a)
    bm.release(a)
    bm.release(a)  # unreferenced, still cached
    assert bm.free_blocks == 4 and bm.match(d[:1]) == a[:1]
    bm.release(a[:1])
    fresh = bm.allocate(3)  # oldest free first: the two never used, then a[1] (freed first)
    assert a[1] in fresh and a[0] not in fresh
    assert bm.match(d) == [a[0]]  # a[1]'s digest was evicted with it; the chain stops there
    with pytest.raises(RuntimeError):
        bm.allocate(5)
    with pytest.raises(ValueError):
        BlockManager(1, BS)
    assert block_digest(b"", 1, [1, 2, 3, 4]) != d[0]  # another adapter load: another digest


def test_random_workloads_keep_the_bounds_fifo_and_every_block():
    rng = random.Random(0)
    for trial in range(60):
        rows, tokens = rng.randint(1, 6), rng.randint(8, 40)
        blocks = rng.randint(12, 40)
        max_len = blocks * BS // 2
        h = Harness(rows=rows, tokens=max(tokens, rows), blocks=blocks, max_len=max_len)
        seqs = [seq(i, rng.randint(1, min(30, max_len - 1)), max_new=rng.randint(1, 12)) for i in range(rng.randint(1, 10))]
        h.add(*seqs)
        for _ in range(400):
            out = h.step()
            if out is None:
                break
            chunks, plan = out
            assert plan.num_tokens <= max(tokens, rows) and h.batch.running <= rows
            assert all(n >= 1 for _, n in chunks)
            assert (plan.counts[: plan.num_single] == 1).all()
        assert not h.batch.running and not h.scheduler.waiting, "every request finishes"
        assert h.blocks.free_blocks == h.blocks.usable_blocks and not h.pins
