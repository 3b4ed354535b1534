"""The model runner: one step's host inputs in, the drawing rows' logits out.

    runner = ModelRunner(decoder, banks, pool, attention, device, graphs="auto", max_graph_rows=256, max_blocks_per_seq=64)
    logits = runner.forward(inputs)        # inputs: StepInputs; logits [N, V] on the device

Per step, once: the inputs go to the device, the attention backend builds its metadata, and
the adapter route is planned on the host from the tokens' slots (which slots are present, the
ranks to compute, LoRA's token groups) and set for every adapted layer (`flora.routing`). Then
one forward over the packed tokens, and the logits of the rows that draw a token.

CUDA graphs (`graphs="auto"` on CUDA): a decode step (every row one token, every row draws)
replays a graph captured for its batch-size bucket over static input buffers; rows past the
step's count are padding, writing their keys into the scratch block and attending to it alone.
A graph is keyed by the bucket and by what the route makes the adapted layers compute (ranks,
bias scaling), captured the first time that key is seen. Loading an adapter copies into its
bank slot, which the graph reads like any buffer: never a re-capture. Steps with prefill chunks,
and LoRA rows whose layers group tokens per adapter (`lora_impl="grouped"`, data-dependent),
run eagerly. `graphs="static"` runs the same static-buffer path without capturing: what a
graph computes, on any device (how the padding and bucketing are tested without a GPU).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from flora.bank import AdapterBanks
from flora.engine.attention import StepAttention, TritonPagedAttention
from flora.engine.batch import StepInputs
from flora.engine.kv_cache import SCRATCH_BLOCK, KVPool
from flora.routing import Route, RoutePlan

log = logging.getLogger(__name__)

GRAPH_MODES = ("auto", "off", "static")


def _dev(a: np.ndarray, device: torch.device, dtype=torch.long) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.to(device=device, dtype=dtype, non_blocking=True)


class ModelRunner:
    def __init__(
        self,
        decoder,
        banks: AdapterBanks | None,
        pool: KVPool,
        attention,
        device: torch.device,
        *,
        linear=torch.nn.functional.linear,
        graphs: str = "auto",
        max_graph_rows: int = 256,
        max_blocks_per_seq: int = 1,
    ):
        if graphs not in GRAPH_MODES:
            raise ValueError(f"graphs={graphs!r}: choose one of {GRAPH_MODES}")
        self.decoder = decoder
        self.banks = banks
        self.pool = pool
        self.attention = attention
        self.device = device
        self.linear = linear  # adapted layers' base matmuls (`Route.linear`)
        self.compute_s = 0.0  # the last forward's time in the model itself (no input preparation)
        capture = graphs == "auto" and device.type == "cuda"
        self.graphs = None
        if (capture or graphs == "static") and max_graph_rows > 0:
            if not isinstance(attention, TritonPagedAttention):
                if graphs == "static":
                    raise ValueError("graphs='static' needs attention='triton' (static shapes)")
                log.warning("CUDA graphs need the Triton attention backend; decode steps run eagerly")
            else:
                self.graphs = DecodeGraphs(self, max_graph_rows, max_blocks_per_seq, capture=capture)
        # Layers that group LoRA tokens per adapter cannot be captured (their work depends on the data).
        self._lora_graphable = banks is None or all(l.lora_impl == "bmm" for l in banks.layers.values())

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        plan = self._plan(inputs.token_slots)
        if self.graphs is not None and inputs.decode_only and self._graphable(plan) and inputs.num_tokens <= self.graphs.max_rows:
            return self.graphs.run(inputs, plan)
        attention = self.attention.prepare(inputs.layout, self.pool, self.device)
        ids = _dev(inputs.input_ids, self.device)
        positions = _dev(inputs.positions, self.device)
        keep = None if len(inputs.logits_index) == inputs.num_tokens else _dev(inputs.logits_index, self.device)
        with self._routed(_dev(inputs.token_slots, self.device), plan, inputs.token_slots):
            started = time.perf_counter()
            hidden = self.decoder.forward(ids, positions, attention)  # [T, hidden]
            logits = self.decoder.logits(hidden if keep is None else hidden.index_select(0, keep))  # [N, V]
            self.compute_s = time.perf_counter() - started
            return logits

    def _plan(self, token_slots: np.ndarray) -> RoutePlan | None:
        if self.banks is None:
            return None
        return self.banks.plan(token_slots)  # cached by the banks while nothing loads

    def _graphable(self, plan: RoutePlan | None) -> bool:
        return plan is None or plan.lora_rank == 0 or self._lora_graphable

    def _routed(self, slots: torch.Tensor, plan: RoutePlan | None, host_slots: np.ndarray | None = None):
        """Every adapted layer runs token t through slot `slots[t]` inside this block."""
        if self.banks is None:
            return contextlib.nullcontext()
        groups = None
        if plan.lora_slots and host_slots is not None:
            # LoRA's tokens per slot, from the host copy: one upload, no device read per layer.
            order = np.argsort(host_slots, kind="stable")
            ordered = host_slots[order]
            lo = np.searchsorted(ordered, plan.lora_slots, side="left")
            hi = np.searchsorted(ordered, plan.lora_slots, side="right")
            order_t = _dev(order, self.device)
            groups = [(s, order_t[a:b]) for s, a, b in zip(plan.lora_slots, lo.tolist(), hi.tolist())]
        return _route_context(self.banks, Route(slots, plan, groups, linear=self.linear, host_slots=host_slots))


@contextlib.contextmanager
def _route_context(banks: AdapterBanks, route: Route):
    previous = banks.routing.set(route)
    try:
        yield route
    finally:
        banks.routing.set(previous)


# --------------------------------------------------------------------------- CUDA graphs


class _StaticStep(StepAttention):
    """Triton paged attention over the graphs' static metadata buffers (one query per sequence)."""

    def __init__(self, pool, write_block, write_offset, query_start, seq_lens, block_tables):
        super().__init__(pool, write_block, write_offset)
        self.query_start, self.seq_lens, self.block_tables = query_start, seq_lens, block_tables

    def compute(self, q, k, v, k_cache, v_cache, scale):
        from flora.kernels.paged_attention import paged_attention

        return paged_attention(q.contiguous(), k_cache, v_cache, self.block_tables, self.seq_lens,
                               self.query_start, scale, max_query_len=1)


@dataclass
class _Graph:
    run: object  # replays (a captured graph) or recomputes (static mode) into `logits`
    logits: torch.Tensor


class DecodeGraphs:
    """Decode steps over static buffers, per batch-size bucket (see the module docstring)."""

    def __init__(self, runner: ModelRunner, max_rows: int, max_blocks: int, *, capture: bool):
        self.runner = runner
        self.capture = capture
        self.max_rows = max_rows
        self.buckets = sorted({*(b for b in (1, 2, 4, 8) if b < max_rows), *range(16, max_rows, 16), max_rows})
        dev = runner.device
        self.ids = torch.zeros(max_rows, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_rows, dtype=torch.long, device=dev)
        self.slots = torch.zeros(max_rows, dtype=torch.long, device=dev)
        self.write_block = torch.full((max_rows,), SCRATCH_BLOCK, dtype=torch.long, device=dev)
        self.write_offset = torch.zeros(max_rows, dtype=torch.long, device=dev)
        self.seq_lens = torch.ones(max_rows, dtype=torch.int32, device=dev)
        self.query_start = torch.arange(max_rows + 1, dtype=torch.int32, device=dev)
        self.block_tables = torch.full((max_rows, max_blocks), SCRATCH_BLOCK, dtype=torch.int32, device=dev)
        self.graphs: dict[tuple, _Graph] = {}
        self._mempool = torch.cuda.graph_pool_handle() if capture else None

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def run(self, inputs: StepInputs, plan: RoutePlan | None) -> torch.Tensor:
        n = inputs.num_tokens
        b = self.bucket(n)
        lay = inputs.layout
        width = lay.block_tables.shape[1]
        self.ids[:n].copy_(_dev(inputs.input_ids, self.runner.device), non_blocking=True)
        self.positions[:n].copy_(_dev(inputs.positions, self.runner.device), non_blocking=True)
        self.slots[:n].copy_(_dev(inputs.token_slots, self.runner.device), non_blocking=True)
        self.write_block[:n].copy_(_dev(lay.write_block, self.runner.device), non_blocking=True)
        self.write_offset[:n].copy_(_dev(lay.write_offset, self.runner.device), non_blocking=True)
        self.seq_lens[:n].copy_(_dev(lay.seq_lens, self.runner.device, torch.int32), non_blocking=True)
        self.block_tables[:n, :width].copy_(_dev(lay.block_tables, self.runner.device, torch.int32), non_blocking=True)
        if b > n:  # padding rows: token 0 at position 0 of the scratch block, base model
            for buf, value in ((self.ids, 0), (self.positions, 0), (self.slots, 0), (self.write_block, SCRATCH_BLOCK),
                               (self.write_offset, 0), (self.seq_lens, 1)):
                buf[n:b].fill_(value)
            self.block_tables[n:b, 0].fill_(SCRATCH_BLOCK)
        key = (b, None if plan is None else (plan.mul_rank, plan.lora_rank, plan.scales_bias))
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._build(b, plan)
        started = time.perf_counter()
        with self.runner._routed(self.slots[:b], plan):  # a replay runs no Python: route observers hear of it here
            graph.run()
        self.runner.compute_s = time.perf_counter() - started
        return graph.logits[:n]

    def _build(self, b: int, plan: RoutePlan | None) -> _Graph:
        r = self.runner
        attention = _StaticStep(r.pool, self.write_block[:b], self.write_offset[:b], self.query_start[: b + 1],
                                self.seq_lens[:b], self.block_tables[:b])

        def compute() -> torch.Tensor:
            with r._routed(self.slots[:b], plan):
                return r.decoder.logits(r.decoder.forward(self.ids[:b], self.positions[:b], attention))

        if not self.capture:
            holder = _Graph(None, compute())

            def rerun():
                holder.logits = compute()

            holder.run = rerun
            return holder
        log.info("capturing a CUDA graph for decode steps of %d rows (route %s)", b, plan)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            compute()  # warm up (compiles the kernels) outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool):
            logits = compute()
        return _Graph(graph.replay, logits)
