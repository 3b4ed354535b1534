"""Iteration-level scheduling over the paged KV pool: what each step computes.

Every step runs one packed forward over, in this order:
  1. every running row that is decoding (one token each);
  2. the prompt chunks of rows still prefilling, oldest first, as far as the token budget goes;
  3. waiting requests, admitted first come first served while a row, budget and blocks remain.
    decode tokens + prefill tokens <= max_batch_tokens,   running rows <= max_batch_rows
A long prompt is prefilled over several steps while other rows keep decoding; a younger row
never delays an older one.

Blocks: a row takes a block when its next token starts one. When the free blocks do not cover
the step, the newest running rows are preempted, newest first: their blocks go back to the pool
(their full blocks stay in the prefix cache), and they go back to the front of the queue with
their tokens so far, to be recomputed when blocks are free again (mostly from the prefix cache).
A row's length is capped so that it fits the pool alone, so the oldest row always makes
progress. A waiting request whose first chunk finds no free blocks waits, and so do the ones
behind it.

Adapters: a request whose adapter is still loading is skipped without blocking those behind it;
one that needs an adapter slot that no running request has freed yet stops admission, so later
requests cannot keep the slots busy and starve it. Admission pins the adapter's slot until the
row finishes or is preempted.

Prefix cache: an admitted sequence first looks up the digests of its full blocks (all but its
last token, which must be computed to give logits) under its adapter's load id; the blocks
found are shared and their tokens are not computed again.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from flora.engine.batch import BatchState, StepPlan
from flora.engine.kv_cache import BlockManager, block_digest
from flora.engine.request import Request, RequestHandle


class Admission(enum.Enum):
    READY = "ready"  # adapter resident and pinned: admit now
    WAIT = "wait"  # adapter loading: skip, admit later
    BLOCKED = "blocked"  # adapter loaded but every slot is in use: stop admitting
    FAILED = "failed"  # the request was failed (e.g. its adapter cannot be loaded): drop it


@dataclass(eq=False, slots=True)
class Sequence:
    """One request inside the engine.

    The engine thread owns the scheduling state (`tokens` while not running, `row`, `slot`,
    `digests`); the output side owns what the caller sees (`output` and the fields after it),
    written only by `OutputProcessor`.
    """

    request: Request
    handle: RequestHandle
    number: int  # arrival order
    arrival_s: float
    stop_ids: frozenset[int]
    seed: int
    tokens: list[int]  # prompt, then the output drawn before a preemption
    num_prompt: int
    state: str = "waiting"  # waiting | running | done
    row: int | None = None  # batch row while running
    slot: int | None = None  # adapter slot pinned while running
    digests: list[bytes] = field(default_factory=list)  # of its full blocks, under `digest_key`
    digest_key: int | None = None
    preemptions: int = 0
    last_drawn_s: float = float("nan")  # when it last drew a token, kept across a preemption
    # output side
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    text_checked: int = 0  # characters of decoded output already searched for stop strings
    first_token_s: float | None = None
    done: bool = False  # its RequestOutput was delivered

    def __repr__(self) -> str:
        return f"Sequence({self.request.request_id}, adapter={self.request.adapter!r}, state={self.state}, row={self.row})"


class Scheduler:
    """The waiting queue, admission, the token budget and block allocation with preemption.

    admit(seq) pins the sequence's adapter (setting `seq.slot`) or says why not; release(seq)
    unpins it; adapter_key(slot) is the load id that keys cached blocks computed under that slot.
    """

    def __init__(
        self,
        batch: BatchState,
        blocks: BlockManager,
        max_batch_tokens: int,
        *,
        admit: Callable[[Sequence], Admission],
        release: Callable[[Sequence], None],
        adapter_key: Callable[[int], int],
    ):
        self.batch = batch
        self.blocks = blocks
        self.max_batch_tokens = max_batch_tokens
        self._admit, self._release, self._adapter_key = admit, release, adapter_key
        self.waiting: deque[Sequence] = deque()
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove_waiting(self, seq: Sequence) -> None:
        self.waiting.remove(seq)

    @property
    def prefilling(self) -> int:
        b = self.batch
        return int((b.active & (b.num_tokens - b.num_computed > 1)).sum())

    # ------------------------------------------------------------------ the plan

    def schedule(self) -> StepPlan | None:
        """This step's rows and token counts (None: nothing to compute)."""
        b = self.batch
        running = b.running_rows()
        decoding = b.num_tokens[running] - b.num_computed[running] == 1
        decode = self._fit(running[decoding], np.ones(int(decoding.sum()), dtype=np.int64))
        prefilling = running[~decoding]
        if not len(prefilling) and not self.waiting:  # the steady state: every row decodes
            return StepPlan(decode, np.ones(len(decode), dtype=np.int64), len(decode)) if len(decode) else None
        budget = self.max_batch_tokens - len(decode)
        rows, counts = [decode], [np.ones(len(decode), dtype=np.int64)]
        for row in prefilling:  # oldest first
            if budget <= 0 or not b.active[row]:
                continue
            n = min(int(b.num_tokens[row] - b.num_computed[row]), budget)
            kept = self._fit(np.array([row]), np.array([n]))
            if len(kept):
                rows.append(kept)
                counts.append(np.array([n]))
                budget -= n
        rows, counts = self._drop_preempted(rows, counts)
        for row, n in self._admit_waiting(budget):
            rows.append(np.array([row]))
            counts.append(np.array([n]))
        rows, counts = np.concatenate(rows), np.concatenate(counts)
        if not len(rows):
            return None
        single = counts == 1
        order = np.concatenate([np.flatnonzero(single), np.flatnonzero(~single)])  # one-token chunks first
        return StepPlan(rows[order], counts[order], int(single.sum()))

    def _drop_preempted(self, rows, counts):
        """Rows planned earlier in this step and preempted later by another row's chunk."""
        rows, counts = np.concatenate(rows), np.concatenate(counts)
        keep = self.batch.active[rows]
        return [rows[keep]], [counts[keep]]

    def _fit(self, rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Allocate the blocks `rows` need for `counts` more tokens, preempting the newest running
        rows while the pool is short. Returns the rows still running (with their blocks)."""
        b = self.batch
        while len(rows):
            need = b.blocks_short(rows, counts)
            if need.sum() <= self.blocks.free_blocks:
                for row, n in zip(rows[need > 0].tolist(), need[need > 0].tolist()):
                    b.append_blocks(row, self.blocks.allocate(n))
                return rows
            victim = int(b.running_rows()[-1])
            self.preempt(victim)
            keep = rows != victim
            rows, counts = rows[keep], counts[keep]
        return rows

    def _admit_waiting(self, budget: int) -> list[tuple[int, int]]:
        admitted = []
        for seq in list(self.waiting):
            if budget <= 0 or not self.batch.free_rows:
                break
            status = self._admit(seq)
            if status is Admission.WAIT:
                continue
            if status is Admission.BLOCKED:
                break
            if status is Admission.FAILED:
                self.waiting.remove(seq)
                continue
            placed = self._place(seq, budget)
            if placed is None:  # no blocks for its first chunk: it (and all behind it) waits
                self._release(seq)
                break
            self.waiting.remove(seq)
            admitted.append(placed)
            budget -= placed[1]
        return admitted

    def _place(self, seq: Sequence, budget: int) -> tuple[int, int] | None:
        """A row and blocks for `seq`'s first chunk (after the prefix cache's hits), or None."""
        bs = self.blocks.block_size
        key = self._adapter_key(seq.slot)
        hits = self.blocks.match(self._digests(seq, key, (len(seq.tokens) - 1) // bs))
        cached = len(hits) * bs
        n = min(len(seq.tokens) - cached, budget)
        fresh = self.blocks.blocks_for(cached + n) - len(hits)
        if fresh > self.blocks.free_blocks:
            self.blocks.release(hits)
            return None
        blocks = hits + self.blocks.allocate(fresh)
        seq.row = self.batch.add(seq, slot=seq.slot, blocks=blocks, num_computed=cached)
        seq.state = "running"
        return seq.row, n

    def _digests(self, seq: Sequence, key: int, count: int, tokens=None) -> list[bytes]:
        """The digests of `seq`'s first `count` full blocks under adapter load `key` (computed once)."""
        if seq.digest_key != key:
            seq.digests, seq.digest_key = [], key
        tokens = seq.tokens if tokens is None else tokens
        bs = self.blocks.block_size
        while len(seq.digests) < count:
            i = len(seq.digests)
            parent = seq.digests[-1] if i else b""
            seq.digests.append(block_digest(parent, key, tokens[i * bs : (i + 1) * bs]))
        return seq.digests[:count]

    # ------------------------------------------------------------------ after a step, and leaving

    def register_full_blocks(self, plan: StepPlan) -> None:
        """Put the blocks this step filled into the prefix cache (Python only for those rows)."""
        if not self.blocks.prefix_caching:
            return
        b, bs = self.batch, self.blocks.block_size
        after = b.num_computed[plan.rows] // bs
        before = (b.num_computed[plan.rows] - plan.counts) // bs
        for j in np.flatnonzero(after > before).tolist():
            row = int(plan.rows[j])
            seq = b.seqs[row]
            digests = self._digests(seq, self._adapter_key(seq.slot), int(after[j]), b.token_ids[row])
            for i in range(int(before[j]), int(after[j])):
                self.blocks.register(int(b.block_table[row, i]), digests[i])

    def finish(self, seq: Sequence) -> None:
        """Take a running or waiting sequence out for good: its row, blocks and adapter pin go back."""
        if seq.state == "running":
            self._vacate(seq)
        elif seq.state == "waiting" and seq in self.waiting:
            self.waiting.remove(seq)
        seq.state = "done"

    def preempt(self, row: int) -> None:
        """Send `row`'s sequence back to the front of the queue, to be recomputed later."""
        seq = self.batch.seqs[row]
        self._vacate(seq)
        seq.state = "waiting"
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _vacate(self, seq: Sequence) -> None:
        seq.tokens, blocks = self.batch.remove(seq.row)
        self.blocks.release(blocks)
        self._release(seq)
        seq.row = None
