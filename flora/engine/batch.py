"""The running sequences as rows of host arrays: a step's inputs and bookkeeping are numpy
operations over all rows at once, never Python per row.

A sequence gets a row when it is admitted and gives it back when it finishes or is preempted.
Its row holds its tokens (prompt, then output), how many of them have keys and values in the
pool (`num_computed`), its block table, its adapter slot and its sampling parameters. A step
computes `counts[i]` tokens of row `rows[i]`, starting at `num_computed`; a row whose chunk
reaches its last token draws the next one. While a row runs these arrays are the only copy of
its state; `Sequence` objects hold what the rows do not (the request, its handle).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flora.engine.attention import AttentionLayout
from flora.engine.sampling import SamplingBatch


@dataclass
class StepPlan:
    """What one step computes: `counts[i]` tokens of batch row `rows[i]`; the first `num_single`
    rows compute one token each (decode rows, and prompts down to their last token)."""

    rows: np.ndarray
    counts: np.ndarray
    num_single: int

    @property
    def num_tokens(self) -> int:
        return int(self.counts.sum())

    def subset(self, index: np.ndarray) -> StepPlan:
        counts = self.counts[index]
        return StepPlan(self.rows[index], counts, int((np.asarray(index) < self.num_single).sum()))


@dataclass
class StepInputs:
    """The model inputs of one step (host arrays; `[T]` packed tokens, `[N]` rows that draw)."""

    input_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    token_slots: np.ndarray  # [T] adapter slot of each token
    layout: AttentionLayout
    logits_index: np.ndarray  # [N] the token whose hidden state gives each drawing row's logits
    sample_rows: np.ndarray  # [N] batch rows that draw a token
    sampling: SamplingBatch
    prompt_tokens: int  # of the T tokens, how many are prompt tokens
    context_tokens: int  # keys the step's attention reads (Σ over rows of their length after it)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def decode_only(self) -> bool:
        """Every sequence computes one token and draws the next (a CUDA-graph step)."""
        return len(self.sample_rows) == len(self.input_ids) == self.layout.num_single


class BatchState:
    def __init__(self, rows: int, max_len: int, block_size: int):
        self.rows = rows
        self.max_len = max_len
        self.block_size = block_size
        self.max_blocks = -(-max_len // block_size)
        self.seqs: list = [None] * rows
        self._free = list(range(rows - 1, -1, -1))  # pop() hands out low rows first
        self._admissions = 0
        self.active = np.zeros(rows, dtype=bool)
        self.admitted = np.zeros(rows, dtype=np.int64)  # admission order: preemption takes the newest
        self.token_ids = np.zeros((rows, max_len), dtype=np.int64)
        self.num_tokens = np.zeros(rows, dtype=np.int64)
        self.num_computed = np.zeros(rows, dtype=np.int64)
        self.num_prompt = np.zeros(rows, dtype=np.int64)
        self.max_total = np.zeros(rows, dtype=np.int64)  # a row finishes with this many tokens
        self.block_table = np.zeros((rows, self.max_blocks), dtype=np.int32)
        self.num_blocks = np.zeros(rows, dtype=np.int64)
        self.slot = np.zeros(rows, dtype=np.int64)
        self.greedy = np.ones(rows, dtype=bool)
        self.temperature = np.ones(rows, dtype=np.float32)
        self.top_k = np.zeros(rows, dtype=np.int64)
        self.top_p = np.ones(rows, dtype=np.float32)
        self.seed = np.zeros(rows, dtype=np.int64)
        self.logprobs = np.full(rows, -1, dtype=np.int64)
        self.stop_ids = np.full((rows, 1), -1, dtype=np.int64)  # padded with -1
        self._arange = np.arange(rows + 1, dtype=np.int64)  # query starts of a step of one token per row
        self.arrival_s = np.zeros(rows)  # when the request arrived (time.monotonic)
        self.last_token_s = np.full(rows, np.nan)  # when the row last drew a token; nan: never

    # ------------------------------------------------------------------ rows

    @property
    def free_rows(self) -> int:
        return len(self._free)

    @property
    def running(self) -> int:
        return self.rows - len(self._free)

    def add(self, seq, *, slot: int, blocks: list[int], num_computed: int) -> int:
        """Give `seq` (its `tokens`, `num_prompt`, request) a row; returns the row."""
        row = self._free.pop()
        self._admissions += 1
        tokens, request = seq.tokens, seq.request
        n = len(tokens)
        self.seqs[row] = seq
        self.active[row] = True
        self.admitted[row] = self._admissions
        self.token_ids[row, :n] = tokens
        self.num_tokens[row] = n
        self.num_computed[row] = num_computed
        self.num_prompt[row] = seq.num_prompt
        self.max_total[row] = min(seq.num_prompt + request.max_new_tokens, self.max_len)
        self.block_table[row, : len(blocks)] = blocks
        self.num_blocks[row] = len(blocks)
        self.slot[row] = slot
        p = request.sampling
        self.greedy[row] = p.greedy
        self.temperature[row] = p.temperature if not p.greedy else 1.0
        self.top_k[row], self.top_p[row], self.seed[row] = p.top_k, p.top_p, seq.seed
        self.logprobs[row] = -1 if p.logprobs is None else p.logprobs
        stops = sorted(seq.stop_ids)
        if len(stops) > self.stop_ids.shape[1]:
            wider = np.full((self.rows, len(stops)), -1, dtype=np.int64)
            wider[:, : self.stop_ids.shape[1]] = self.stop_ids
            self.stop_ids = wider
        self.stop_ids[row] = -1
        self.stop_ids[row, : len(stops)] = stops
        self.arrival_s[row] = seq.arrival_s
        self.last_token_s[row] = seq.last_drawn_s
        return row

    def remove(self, row: int) -> tuple[list[int], list[int]]:
        """Free `row`; returns its tokens and its blocks (for the caller to release)."""
        self.seqs[row].last_drawn_s = float(self.last_token_s[row])
        tokens = self.token_ids[row, : self.num_tokens[row]].tolist()
        blocks = self.blocks(row)
        self.seqs[row] = None
        self.active[row] = False
        self.num_blocks[row] = 0
        self._free.append(row)
        return tokens, blocks

    def blocks(self, row: int) -> list[int]:
        return self.block_table[row, : self.num_blocks[row]].tolist()

    def append_blocks(self, row: int, blocks: list[int]) -> None:
        n = self.num_blocks[row]
        self.block_table[row, n : n + len(blocks)] = blocks
        self.num_blocks[row] = n + len(blocks)

    def blocks_short(self, rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """How many more blocks each row needs to hold `counts` more computed tokens."""
        need = -(-(self.num_computed[rows] + counts) // self.block_size) - self.num_blocks[rows]
        return np.maximum(need, 0)

    def running_rows(self) -> np.ndarray:
        """Active rows, oldest admission first."""
        rows = np.flatnonzero(self.active)
        return rows[np.argsort(self.admitted[rows], kind="stable")]

    # ------------------------------------------------------------------ one step

    def inputs(self, plan: StepPlan) -> StepInputs:
        """The packed model inputs of `plan` (vectorised over its rows)."""
        rows, counts, bs = plan.rows, plan.counts, self.block_size
        n = len(rows)
        starts = self.num_computed[rows]  # [S] first position computed
        if plan.num_single == n:  # one token per row (decode steps): tokens are rows
            cu = self._arange[: n + 1]
            token_row, positions = rows, starts
        else:
            cu = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(counts, out=cu[1:])
            token_row = np.repeat(rows, counts)  # [T]
            positions = np.repeat(starts - cu[:-1], counts) + np.arange(cu[-1])
        seq_lens = starts + counts
        width = int(-(-seq_lens.max() // bs))
        layout = AttentionLayout(
            query_start=cu, seq_lens=seq_lens, block_tables=self.block_table[rows, :width],
            write_block=self.block_table[token_row, positions // bs].astype(np.int64), write_offset=positions % bs,
            num_single=plan.num_single, max_query_len=int(counts.max()),
        )
        draws = seq_lens == self.num_tokens[rows]  # the chunk reaches the row's last token
        sample_rows = rows[draws]
        prompt = np.minimum(self.num_prompt[rows], seq_lens) - starts
        return StepInputs(
            input_ids=self.token_ids[token_row, positions],
            positions=positions,
            token_slots=self.slot[token_row],
            layout=layout,
            logits_index=cu[1:][draws] - 1,
            sample_rows=sample_rows,
            sampling=self._sampling(sample_rows),
            prompt_tokens=int(prompt[prompt > 0].sum()),
            context_tokens=int(seq_lens.sum()),
        )

    def _sampling(self, rows: np.ndarray) -> SamplingBatch:
        greedy = self.greedy[rows]
        if greedy.all():  # nothing to draw at random: the sampler reads no other parameter
            return SamplingBatch(greedy=greedy, logprobs=self.logprobs[rows])
        return SamplingBatch(
            greedy=greedy, logprobs=self.logprobs[rows], temperature=self.temperature[rows], top_k=self.top_k[rows],
            top_p=self.top_p[rows], seed=self.seed[rows], draw=self.num_tokens[rows] - self.num_prompt[rows],
        )

    def advance(self, plan: StepPlan, sample_rows: np.ndarray, tokens: np.ndarray, now: float) -> Advanced:
        """Record a step that ended at `now`: the plan's tokens are computed, each drawing row
        gets its token. Returns which rows stopped and the latencies the step completes."""
        self.num_computed[plan.rows] += plan.counts
        at = self.num_tokens[sample_rows]
        self.token_ids[sample_rows, at] = tokens
        self.num_tokens[sample_rows] = at + 1
        last = self.last_token_s[sample_rows]
        first = np.isnan(last)
        self.last_token_s[sample_rows] = now
        return Advanced(
            stopped=(self.stop_ids[sample_rows] == tokens[:, None]).any(axis=1),
            length=self.num_tokens[sample_rows] >= self.max_total[sample_rows],
            ttft_s=now - self.arrival_s[sample_rows[first]],
            gaps_s=now - last[~first],
        )


@dataclass
class Advanced:
    """What one step's drawn tokens did, per drawing row: stopped on a stop token, reached its
    length (max_new_tokens, the context, or what the pool holds: `max_total`); and the times
    from arrival to first token and between tokens that the step completes."""

    stopped: np.ndarray
    length: np.ndarray
    ttft_s: np.ndarray
    gaps_s: np.ndarray
