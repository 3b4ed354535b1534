"""Sampling against Hugging Face's logits warpers (the independent reference) and against the
distribution it should draw from; a row's draws depend on its seed and draw index only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from flora.engine.request import RequestRejected, SamplingParams
from flora.engine.sampling import SamplingBatch, draw_tokens, sample, uniform, warp_logits


def hf_warped(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    scores = TemperatureLogitsWarper(p.temperature)(None, logits[None].clone())
    if p.top_k:
        scores = TopKLogitsWarper(p.top_k)(None, scores)
    if p.top_p < 1:
        scores = TopPLogitsWarper(p.top_p)(None, scores)
    return scores[0]


PARAMS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.5, top_p=0.8),
    SamplingParams(temperature=0.5, top_k=12, top_p=0.6),
    SamplingParams(temperature=2.0, top_k=1),
    SamplingParams(temperature=1.0, top_p=0.05),
]


def batch_of(params: list[SamplingParams], seeds, draws) -> SamplingBatch:
    return SamplingBatch(
        greedy=np.array([p.greedy for p in params]),
        temperature=np.array([p.temperature for p in params], dtype=np.float32),
        top_k=np.array([p.top_k for p in params]), top_p=np.array([p.top_p for p in params], dtype=np.float32),
        seed=np.array(seeds, dtype=np.int64), draw=np.array(draws, dtype=np.int64),
        logprobs=np.array([-1 if p.logprobs is None else p.logprobs for p in params]),
    )


def test_warp_logits_equals_hf_warpers():
    logits = torch.randn(len(PARAMS), 50, generator=torch.Generator().manual_seed(0)) * 3
    logits[1, 7] = logits[1, 8]  # a tie
    warped = warp_logits(
        logits,
        torch.tensor([p.temperature for p in PARAMS]),
        torch.tensor([p.top_k for p in PARAMS]),
        torch.tensor([p.top_p for p in PARAMS]),
    )
    for i, p in enumerate(PARAMS):
        expected = hf_warped(logits[i], p)
        assert torch.equal(torch.isinf(warped[i]), torch.isinf(expected)), p
        kept = ~torch.isinf(expected)
        torch.testing.assert_close(warped[i][kept], expected[kept])
    assert torch.isinf(warped[4]).sum() == 49 and torch.isinf(warped[0]).sum() == 0  # filters did filter


@pytest.mark.parametrize("p", [SamplingParams(temperature=0.8, top_k=4), SamplingParams(temperature=1.3, top_p=0.7)])
def test_draws_follow_the_warped_distribution(p):
    logits = torch.randn(1, 8, generator=torch.Generator().manual_seed(1)) * 2
    n = 6000
    draws = draw_tokens(
        logits.expand(n, -1), torch.full((n,), p.temperature), torch.full((n,), p.top_k), torch.full((n,), p.top_p),
        seed=torch.full((n,), 12345), draw=torch.arange(n),
    )
    expected = hf_warped(logits[0], p).softmax(-1)
    freq = torch.bincount(draws, minlength=8).float() / n
    assert (freq[expected == 0] == 0).all()  # filtered tokens are never drawn
    torch.testing.assert_close(freq, expected, atol=0.025, rtol=0)


def test_uniform_is_uniform_and_a_function_of_seed_and_draw():
    seeds = torch.randint(0, 2**62, (4,), generator=torch.Generator().manual_seed(3))
    u = uniform(seeds.repeat_interleave(5000), torch.arange(5000).repeat(4))
    assert 0 <= u.min() and u.max() < 1 and u.unique().numel() == u.numel()
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.003
    hist = torch.histc(u.float(), bins=10, min=0, max=1) / u.numel()
    assert (hist - 0.1).abs().max() < 0.01
    # the same (seed, draw) gives the same number wherever it sits in a batch
    again = uniform(seeds[[2, 0]], torch.tensor([17, 4999]))
    assert torch.equal(again, torch.stack([u[2 * 5000 + 17], u[4999]]))


def test_rows_draw_from_their_own_streams():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(temperature=0.9, top_p=0.9), SamplingParams()]
    seeds = [11, 22, 33, 44]

    def run(rows, draw):
        return sample(logits[rows], batch_of([params[i] for i in rows], [seeds[i] for i in rows], [draw] * len(rows))).tokens.tolist()

    together = [run([0, 1, 2, 3], d) for d in range(20)]
    assert [run([1], d) for d in range(20)] == [[t[1]] for t in together]
    assert [run([2, 1], d) for d in range(20)] == [[t[2], t[1]] for t in together]
    assert [t[0] for t in together] == [int(logits[0].argmax())] * 20  # greedy rows take the argmax
    assert len({t[1] for t in together}) > 1  # sampling rows do sample


def test_logprobs_come_back_with_the_tokens():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(4))
    params = [SamplingParams(), SamplingParams(logprobs=0), SamplingParams(temperature=1.0, logprobs=2)]
    out = sample(logits, batch_of(params, [1, 2, 3], [0, 0, 0]))
    expected = torch.log_softmax(logits, -1)
    assert out.logprob.shape == (3,) and out.top_ids.shape == (3, 2)
    for i in range(3):
        assert out.logprob[i] == pytest.approx(float(expected[i, out.tokens[i]]), abs=1e-6)
    values, ids = expected[2].topk(2)
    assert out.top_ids[2].tolist() == ids.tolist()
    assert out.top_logprobs[2].tolist() == pytest.approx(values.tolist(), abs=1e-6)
    assert sample(logits, batch_of(params[:1], [1], [0])).logprob is None  # nobody asked: tokens only


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"logprobs": 100}, "logprobs"),
        ({"seed": "7"}, "seed"),
    ],
)
def test_bad_sampling_params_are_rejected(kwargs, match):
    with pytest.raises(RequestRejected, match=match):
        SamplingParams(**kwargs)
