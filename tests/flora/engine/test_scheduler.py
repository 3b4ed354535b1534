"""The scheduler's plan: token budget (padded prefill tokens), row limit, chunked prefill, FIFO,
adapters that are loading or waiting for a slot."""

from __future__ import annotations

import random

from flora.engine.request import Request, RequestHandle
from flora.engine.scheduler import Admission, Scheduler, Sequence


def seq(n: int, prompt: int, adapter: str | None = None) -> Sequence:
    request = Request([5] * prompt, adapter=adapter)
    return Sequence(request, RequestHandle(request), n, 0.0)


def ready(_):
    return Admission.READY


def test_long_prompt_is_chunked_while_rows_decode():
    s = Scheduler(max_batch_rows=8, max_batch_tokens=10)
    long, short = seq(0, 30), seq(1, 3)
    s.add(long)
    s.add(short)
    plan = s.plan(decoding_rows=2, admit=ready)  # 8 tokens left for prefill
    assert plan == [(long, 8)]  # the oldest takes the budget; the next would need 2 × 8
    assert s.prefilling == [long] and list(s.waiting) == [short]
    long.prefilled += 8
    for expected in (8, 8):
        assert s.plan(decoding_rows=2, admit=ready)[0] == (long, expected)
        long.prefilled += expected
    assert s.plan(decoding_rows=2, admit=ready) == [(long, 6)]  # the rest; still no room for 2 × 6
    long.prefilled += 6
    s.remove(long)  # prompt done: the engine moves it to the decode batch
    assert s.plan(decoding_rows=3, admit=ready) == [(short, 3)]


def test_short_prompts_share_a_step_within_the_padded_budget():
    s = Scheduler(max_batch_rows=16, max_batch_tokens=16)
    seqs = [seq(i, 5) for i in range(5)]
    for q in seqs:
        s.add(q)
    plan = s.plan(decoding_rows=0, admit=ready)
    assert plan == [(q, 5) for q in seqs[:3]]  # a 4th row: 4 × 5 > 16


def test_row_limit():
    s = Scheduler(max_batch_rows=4, max_batch_tokens=100)
    seqs = [seq(i, 2) for i in range(5)]
    for q in seqs:
        s.add(q)
    assert [q for q, _ in s.plan(decoding_rows=2, admit=ready)] == seqs[:2]
    assert s.plan(decoding_rows=2, admit=ready) == [(seqs[0], 2), (seqs[1], 2)]  # still prefilling, no room


def test_loading_adapters_wait_without_blocking_and_blocked_slots_stop_admission():
    s = Scheduler(max_batch_rows=8, max_batch_tokens=64)
    a, b, c, d = seq(0, 4, "loading"), seq(1, 4, "x"), seq(2, 4, "no-slot"), seq(3, 4, "y")
    failed = seq(4, 4, "broken")
    for q in (a, failed, b, c, d):
        s.add(q)
    status = {"loading": Admission.WAIT, "x": Admission.READY, "no-slot": Admission.BLOCKED,
              "y": Admission.READY, "broken": Admission.FAILED}
    plan = s.plan(0, lambda q: status[q.request.adapter])
    # `a` waits for its load without holding up `b`; `c` needs a slot that only finishing
    # requests can free, so `d` (younger) is not admitted past it: it cannot starve `c`.
    assert [q for q, _ in plan] == [b]
    assert list(s.waiting) == [a, c, d]  # `failed` was dropped (the engine finished it)
    status["loading"] = status["no-slot"] = Admission.READY
    assert [q for q, _ in s.plan(0, lambda q: status[q.request.adapter])] == [b, a, c, d]  # arrival order


def test_random_plans_keep_the_bounds_and_fifo_order():
    rng = random.Random(0)
    for trial in range(200):
        rows, tokens = rng.randint(1, 8), rng.randint(8, 64)
        tokens = max(tokens, rows)
        s = Scheduler(rows, tokens)
        decoding = rng.randint(0, rows)
        for i in range(rng.randint(0, 10)):
            s.add(seq(i, rng.randint(1, 80)))
        for _ in range(rng.randint(1, 4)):
            before = list(s.prefilling) + list(s.waiting)
            plan = s.plan(decoding, ready)
            chosen = [q for q, _ in plan]
            width = max((n for _, n in plan), default=0)
            assert decoding + len(s.prefilling) <= rows
            assert decoding + len(plan) * width <= tokens
            assert chosen == before[: len(chosen)]  # oldest first, no skipping
            assert all(0 < n <= q.remaining_prompt for q, n in plan)
            if s.prefilling and decoding < tokens:
                assert plan, "a prefilling row must make progress"  # no starvation
            for q, n in plan:
                q.prefilled += n
            for q in [q for q in s.prefilling if q.remaining_prompt == 0]:
                s.remove(q)
