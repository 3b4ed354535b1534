"""Sampling against Hugging Face's logits warpers (the independent reference) and against the
distribution it should draw from; seeded streams are per request."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from flora.engine.request import RequestRejected, SamplingParams
from flora.engine.sampling import sample_tokens, token_logprobs, warp_logits


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


def test_draws_follow_the_warped_distribution():
    logits = torch.randn(1, 8, generator=torch.Generator().manual_seed(1)) * 2
    p = SamplingParams(temperature=0.8, top_k=4, seed=0)
    gen = torch.Generator().manual_seed(0)
    n = 6000
    draws = torch.tensor([sample_tokens(logits, [p], [gen])[0] for _ in range(n)])
    expected = hf_warped(logits[0], p).softmax(-1)
    freq = torch.bincount(draws, minlength=8).float() / n
    assert (freq[expected == 0] == 0).all()
    torch.testing.assert_close(freq, expected, atol=0.025, rtol=0)


def test_rows_draw_from_their_own_streams():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=3), SamplingParams(temperature=0.9, top_p=0.9), SamplingParams()]

    def run(rows):
        gens = {i: torch.Generator().manual_seed(100 + i) for i in rows}
        out = []
        for _ in range(20):
            out.append(sample_tokens(logits[rows], [params[i] for i in rows], [gens.get(i) for i in rows]))
        return [[step[j] for step in out] for j in range(len(rows))]

    together = run([0, 1, 2, 3])
    assert run([1]) == [together[1]] and run([2, 1]) == [together[2], together[1]]
    assert together[0] == [int(logits[0].argmax())] * 20  # greedy rows take the argmax
    assert len(set(together[1])) > 1  # sampling rows do sample


def test_token_logprobs():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(4))
    out = token_logprobs(logits, [3, 4, 5], [None, 0, 2])
    expected = torch.log_softmax(logits, -1)
    assert out[0] is None
    assert out[1][0] == pytest.approx(float(expected[1, 4]), abs=1e-6) and out[1][1] == ()
    values, ids = expected[2].topk(2)
    assert [t for t, _ in out[2][1]] == ids.tolist()
    assert [v for _, v in out[2][1]] == pytest.approx(values.tolist(), abs=1e-6)


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
