"""Iteration-level scheduling: which rows each step decodes and which prompts it prefills.

Between two steps, finished rows leave (the engine retires them) and waiting requests are
admitted, first come first served. A step runs every decoding row (one token each) and, in a
second forward, prompt chunks of admitted rows. Two bounds hold for every step:

    decoding rows + prefilling rows                      <= max_batch_rows
    decoding rows + prefill rows × widest prefill chunk  <= max_batch_tokens

(prefill chunks are left padded to the widest, so the padded size is what is bounded). Chunks
are given in arrival order: the oldest prefilling row takes as much of the budget as it can,
so a long prompt is prefilled over several steps while running rows keep decoding, and a
younger row never delays an older one. A request whose adapter is still loading is skipped
without blocking those behind it; one that needs an adapter slot that no finished request has
freed yet stops admission, so later requests cannot keep the slots busy and starve it.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from flora.engine.cache import RowKV
from flora.engine.request import Request, RequestHandle


class Admission(enum.Enum):
    READY = "ready"  # adapter resident and pinned: admit now
    WAIT = "wait"  # adapter loading: skip, admit later
    BLOCKED = "blocked"  # adapter loaded but every slot is in use: stop admitting
    FAILED = "failed"  # the request was failed (e.g. its adapter cannot be loaded): drop it


@dataclass(eq=False)
class Sequence:
    """The live state of one request inside the engine."""

    request: Request
    handle: RequestHandle
    number: int  # arrival order
    arrival_s: float
    stop_ids: frozenset[int] = frozenset()
    generator: torch.Generator | None = None
    prefilled: int = 0  # prompt tokens whose keys and values are cached
    kv: RowKV | None = None  # between prefill chunks, and until the row joins the decode batch
    slot: int | None = None  # the adapter slot pinned for it while admitted
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    text_checked: int = 0  # characters of decoded output already searched for stop strings
    first_token_s: float | None = None
    last_token_s: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request.request_id}, adapter={self.request.adapter!r}, "
            f"prefilled={self.prefilled}/{len(self.prompt)}, output={len(self.output)})"
        )

    @property
    def prompt(self) -> tuple[int, ...]:
        return self.request.prompt

    @property
    def remaining_prompt(self) -> int:
        return len(self.request.prompt) - self.prefilled

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Scheduler:
    """FIFO queues of waiting and prefilling sequences, and the plan of each step."""

    def __init__(self, max_batch_rows: int, max_batch_tokens: int):
        self.max_batch_rows = max_batch_rows
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []  # admitted, prompt not yet fully cached; oldest first

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def plan(self, decoding_rows: int, admit: Callable[[Sequence], Admission]) -> list[tuple[Sequence, int]]:
        """Prefill chunks `[(sequence, tokens)]` for this step, next to `decoding_rows` decoding rows.

        Admits waiting sequences (calling `admit`, which pins their adapter) only when they get a
        chunk in this step. Moves admitted ones from `waiting` to `prefilling`.
        """
        budget = self.max_batch_tokens - decoding_rows
        rows_free = self.max_batch_rows - decoding_rows - len(self.prefilling)
        chunks: list[tuple[Sequence, int]] = []
        width = 0

        def cap() -> int:  # the widest chunk one more row may take without leaving the budget
            c = budget // (len(chunks) + 1)
            return c if c >= max(width, 1) else 0

        for seq in self.prefilling:
            c = cap()
            if not c:
                return chunks  # older rows first: younger ones wait for the next step
            chunks.append((seq, min(seq.remaining_prompt, c)))
            width = max(width, chunks[-1][1])
        for seq in list(self.waiting):
            c = cap()
            if rows_free <= 0 or not c:
                break
            status = admit(seq)
            if status is Admission.WAIT:
                continue
            if status is Admission.BLOCKED:
                break
            self.waiting.remove(seq)
            if status is Admission.FAILED:
                continue
            self.prefilling.append(seq)
            rows_free -= 1
            chunks.append((seq, min(seq.remaining_prompt, c)))
            width = max(width, chunks[-1][1])
        return chunks
