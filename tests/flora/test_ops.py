"""Every fast op equals its reference loop, for ranks 1..16 and every adapter-popularity pattern."""

import pytest
import torch

from flora import ops

S, DIN, DOUT = 7, 40, 24
POPULARITY = ("identical", "distinct", "uniform", "zipf", "skewed")


def make_slots(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """n slot indices in [0, S) drawn the way real traffic picks adapters (Punica's test patterns)."""
    if kind == "identical":
        return torch.full((n,), 3, dtype=torch.long)
    if kind == "distinct":
        return torch.arange(n) % S
    if kind == "uniform":
        return torch.randint(0, S, (n,), generator=gen)
    if kind == "zipf":
        p = 1.0 / torch.arange(1, S + 1, dtype=torch.float)
        return torch.multinomial(p / p.sum(), n, replacement=True, generator=gen)
    if kind == "skewed":  # one hot adapter, a few others
        s = torch.full((n,), 2, dtype=torch.long)
        s[torch.randperm(n, generator=gen)[: max(1, n // 5)]] = 5
        return s
    raise ValueError(kind)


def make_bank(rank: int, gen: torch.Generator, dtype=torch.float32):
    """A bank whose slots have different ranks (zero-padded components), slot 0 the base model."""
    a = torch.randn(S, rank, DOUT, generator=gen) * 0.5 + 1.0 / rank
    b = torch.randn(S, rank, DIN, generator=gen) * 0.5 + 1.0
    lora_a = torch.randn(S, rank, DIN, generator=gen) * 0.2
    lora_b = torch.randn(S, rank, DOUT, generator=gen) * 0.2
    for slot in range(S):
        used = max(1, (slot * rank) // S)  # slot-dependent rank
        a[slot, used:], b[slot, used:] = 0, 0
        lora_a[slot, used:], lora_b[slot, used:] = 0, 0
    a[0], b[0], lora_a[0], lora_b[0] = 0, 0, 0, 0
    a[0, 0], b[0, 0] = 1, 1  # base slot: identity
    gain = torch.rand(S, DOUT, generator=gen) + 0.5
    return [t.to(dtype) for t in (a, b, lora_a, lora_b, gain)]


def make_inputs(layout: str, popularity: str, gen: torch.Generator, dtype=torch.float32):
    bsz, seq = 6, 3
    if layout == "row":
        x, slots = torch.randn(bsz, seq, DIN, generator=gen), make_slots(popularity, bsz, gen)
    elif layout == "token":
        x, slots = torch.randn(bsz, seq, DIN, generator=gen), make_slots(popularity, bsz * seq, gen).view(bsz, seq)
    else:  # packed tokens of several sequences
        x, slots = torch.randn(bsz * seq, DIN, generator=gen), make_slots(popularity, bsz * seq, gen)
    return x.to(dtype), slots


def assert_close_fp32(actual, expected):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("layout", ["row", "token", "packed"])
def test_flora_linear_matches_reference(layout, popularity):
    gen = torch.Generator().manual_seed(hash((layout, popularity)) % 2**31)
    w0, bias = torch.randn(DOUT, DIN, generator=gen), torch.randn(DOUT, generator=gen)
    for rank in range(1, 17):
        a, b, _, _, gain = make_bank(rank, gen)
        x, slots = make_inputs(layout, popularity, gen)
        for g in (None, gain):
            for used in {1, rank}:
                got = ops.flora_linear(x, w0, bias, a, b, slots, rank=used, gain=g)
                assert_close_fp32(got, ops.flora_linear_reference(x, w0, bias, a, b, slots, rank=used, gain=g))
        assert_close_fp32(ops.flora_linear(x, w0, None, a, b, slots), ops.flora_linear_reference(x, w0, None, a, b, slots))


@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("layout", ["row", "token", "packed"])
def test_lora_deltas_match_reference(layout, popularity):
    gen = torch.Generator().manual_seed(hash((layout, popularity, "lora")) % 2**31)
    for rank in range(1, 17):
        _, _, lora_a, lora_b, _ = make_bank(rank, gen)
        x, slots = make_inputs(layout, popularity, gen)
        expected = ops.lora_delta_reference(x, lora_a, lora_b, slots)
        assert_close_fp32(ops.lora_delta_bmm(x, lora_a, lora_b, slots), expected)
        assert_close_fp32(ops.lora_delta_grouped(x, lora_a, lora_b, slots), expected)
        groups = ops.group_tokens(slots)  # precomputed once per batch, as layers share them
        assert_close_fp32(ops.lora_delta_grouped(x, lora_a, lora_b, slots, groups), expected)


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_bf16_within_1e2_of_reference(rank):
    gen = torch.Generator().manual_seed(rank)
    a, b, lora_a, lora_b, gain = make_bank(rank, gen, torch.bfloat16)
    w0, bias = torch.randn(DOUT, DIN, generator=gen).bfloat16(), torch.randn(DOUT, generator=gen).bfloat16()
    x, slots = make_inputs("row", "uniform", gen, torch.bfloat16)

    def rel_err(got, ref):  # against the float64 spec on the same bf16 inputs
        return ((got.double() - ref).norm() / ref.norm()).item()

    f64 = [t.double() for t in (x, w0, bias, a, b, gain)]
    ref = ops.flora_linear_reference(f64[0], f64[1], f64[2], f64[3], f64[4], slots, gain=f64[5])
    assert rel_err(ops.flora_linear(x, w0, bias, a, b, slots, gain=gain), ref) < 1e-2
    ref = ops.lora_delta_reference(x.double(), lora_a.double(), lora_b.double(), slots)
    assert rel_err(ops.lora_delta_bmm(x, lora_a, lora_b, slots), ref) < 1e-2
    assert rel_err(ops.lora_delta_grouped(x, lora_a, lora_b, slots), ref) < 1e-2


def test_ia3_rows_are_flora_special_case():
    gen = torch.Generator().manual_seed(0)
    w0, bias, x = torch.randn(DOUT, DIN, generator=gen), torch.randn(DOUT, generator=gen), torch.randn(4, 2, DIN, generator=gen)
    slots = torch.zeros(4, dtype=torch.long)
    l_out, l_in = torch.rand(DOUT, generator=gen), torch.rand(DIN, generator=gen)
    a, b = ops.ia3_bank_rows(l_out, feedforward=False, rank=2, dout=DOUT, din=DIN)
    got = ops.flora_linear(x, w0, bias, a[None], b[None], slots, gain=a[None, 0])
    assert_close_fp32(got, l_out * (x @ w0.T + bias))  # PEFT: the bias is scaled too
    a, b = ops.ia3_bank_rows(l_in, feedforward=True, rank=2, dout=DOUT, din=DIN)
    got = ops.flora_linear(x, w0, bias, a[None], b[None], slots)
    assert_close_fp32(got, (l_in * x) @ w0.T + bias)


def test_gradients_match_reference():
    gen = torch.Generator().manual_seed(1)
    a, b, lora_a, lora_b, gain = make_bank(3, gen, torch.float64)
    w0, bias = torch.randn(DOUT, DIN, generator=gen, dtype=torch.float64), torch.randn(DOUT, generator=gen, dtype=torch.float64)
    x, slots = make_inputs("row", "uniform", gen, torch.float64)
    for fast, ref, params in (
        (ops.flora_linear, ops.flora_linear_reference, (a, b)),
        (ops.lora_delta_bmm, ops.lora_delta_reference, (lora_a, lora_b)),
        (ops.lora_delta_grouped, ops.lora_delta_reference, (lora_a, lora_b)),
    ):
        grads = []
        for fn in (fast, ref):
            leaves = [p.clone().requires_grad_(True) for p in params]
            args = (x, w0, bias, *leaves, slots) if fn in (ops.flora_linear, ops.flora_linear_reference) else (x, *leaves, slots)
            (fn(*args) ** 2).sum().backward()
            grads.append([p.grad for p in leaves])
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want)


def test_bad_slot_shapes_are_rejected():
    x = torch.randn(4, 3, DIN)
    with pytest.raises(ValueError, match="one slot per row"):
        ops.expand_slots(x, torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        ops.expand_slots(x, torch.zeros(4))


def test_rank1_with_only_the_output_factor_trainable():
    """IA3 output scaling trains `a` alone: the rank-1 path must keep autograd, not write in place."""
    gen = torch.Generator().manual_seed(2)
    a, b, _, _, _ = make_bank(1, gen)
    w0, bias = torch.randn(DOUT, DIN, generator=gen), torch.randn(DOUT, generator=gen)
    x, slots = make_inputs("row", "uniform", gen)
    a = a.clone().requires_grad_(True)
    y = ops.flora_linear(x, w0, bias, a, b, slots, rank=1, gain=a[:, 0])
    y.sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert_close_fp32(y.detach(), ops.flora_linear_reference(x, w0, bias, a.detach(), b, slots, rank=1, gain=a.detach()[:, 0]))
