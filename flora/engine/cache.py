"""Per-row KV state for batched forwards over a Hugging Face decoder's own attention.

`BatchKV` is a transformers `Cache` holding, for B rows, every layer's keys and values in
buffers `[B, H, N, D]` whose N columns are shared by the rows. `valid [B, N]` says which columns
hold one of that row's tokens; the others are left padding or holes, never attended to. Each
forward appends a window of W columns at `end`: row b's c_b new tokens fill the window's last
c_b columns (left padded), so every row's newest token sits in the last column.

The engine passes the model an explicit 4-D attention mask and explicit position ids
(`prepare`): a token attends to its row's valid columns up to itself, and its position is the
number of that row's tokens before it. Hence left padding and holes change nothing for learned
absolute positions (gpt_bigcode) or rotary ones (llama), and a row computes what it would
compute alone. Padding tokens attend to themselves only, so every softmax row has a finite entry.

`RowKV` is one row's state taken out of a batch (`row`), compact: `[H, n, D]` per layer. Rows
move between batches as `RowKV`s (`from_rows`, `extend`) and leave with `select`.

KV state is never shared between rows or requests: keys and values computed under one adapter
are wrong for another (see DESIGN.md), and this cache has no prefix reuse at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

HEADROOM = 64  # free columns allocated past `end`, so that decoding rarely reallocates


@dataclass
class RowKV:
    """One row's keys and values, oldest token first: per layer `[H, n, D]`."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]


class _LayerKV(CacheLayerMixin):
    """One layer's buffers; the owning `BatchKV` decides where a window goes (`owner.end`)."""

    is_sliding = False

    def __init__(self, owner: BatchKV):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        cap = self.owner.end + key_states.shape[-2] + HEADROOM
        self.keys = key_states.new_zeros(b, h, cap, d)
        self.values = value_states.new_zeros(b, value_states.shape[1], cap, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states: [B, H, W, D], the window's new keys; returns all keys up to the window's end.
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.owner.end
        stop = start + key_states.shape[-2]
        if stop > self.keys.shape[2]:
            self.keys = _grown(self.keys, start, stop)
            self.values = _grown(self.values, start, stop)
        self.keys[:, :, start:stop] = key_states
        self.values[:, :, start:stop] = value_states
        return self.keys[:, :, :stop], self.values[:, :, :stop]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.end + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.end

    def get_max_length(self) -> int:
        return -1


def _grown(buf: torch.Tensor, used: int, need: int) -> torch.Tensor:
    out = buf.new_zeros(*buf.shape[:2], max(need + HEADROOM, 2 * buf.shape[2]), buf.shape[3])
    out[:, :, :used] = buf[:, :, :used]
    return out


class BatchKV(Cache):
    """Keys and values of B rows for every layer; see the module docstring for the layout."""

    def __init__(self, num_layers: int, batch_size: int = 0, device: torch.device | str = "cpu"):
        super().__init__(layers=[_LayerKV(self) for _ in range(num_layers)])
        self.device = torch.device(device)
        self.end = 0  # columns in use
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=self.device)  # [B, end]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # [B] tokens per row
        self._window: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    # ------------------------------------------------------------------ one forward

    def prepare(self, chunks: list[list[int]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Model inputs for appending `chunks[b]` (new token ids, possibly empty) to row b.

        Returns input_ids [B, W] (left padded with 0), position_ids [B, W] and a 4-D additive
        attention_mask [B, 1, W, end + W] in `dtype`; call `commit()` after the forward.
        """
        assert len(chunks) == self.batch_size, (len(chunks), self.batch_size)
        b, w, end = len(chunks), max(len(c) for c in chunks), self.end
        assert w > 0, "every chunk is empty"
        counts = torch.tensor([len(c) for c in chunks], device=self.device)  # [B]
        ids = torch.zeros(b, w, dtype=torch.long)
        for i, c in enumerate(chunks):
            if c:
                ids[i, w - len(c):] = torch.tensor(c, dtype=torch.long)
        col = torch.arange(w, device=self.device)  # [W]
        pad = (w - counts)[:, None]  # [B, 1] padding columns at the window's left
        new_valid = col[None, :] >= pad  # [B, W]
        positions = (self.lengths[:, None] + col[None, :] - pad).clamp(min=0)  # [B, W]
        valid = torch.cat([self.valid[:, :end], new_valid], dim=1)  # [B, K], K = end + W
        mask = attention_mask(valid, w, dtype)
        self._window = (new_valid, counts)
        return {"input_ids": ids.to(self.device), "position_ids": positions, "attention_mask": mask}

    def commit(self) -> None:
        """Account for the window written by the forward that followed `prepare`."""
        assert self._window is not None, "commit() without prepare()"
        new_valid, counts = self._window
        self.valid = torch.cat([self.valid[:, : self.end], new_valid], dim=1)
        self.lengths = self.lengths + counts
        self.end += new_valid.shape[1]
        self._window = None

    def abandon(self) -> None:
        """Forget a prepared window whose forward failed (its columns are overwritten later)."""
        self._window = None

    # ------------------------------------------------------------------ moving rows

    def row(self, i: int) -> RowKV:
        """Row i's keys and values without padding or holes (a copy)."""
        cols = self.valid[i].nonzero().squeeze(1)  # [n]
        layers = self._layers()
        return RowKV(
            [l.keys[i].index_select(1, cols) for l in layers], [l.values[i].index_select(1, cols) for l in layers]
        )

    def select(self, keep: list[int]) -> None:
        """Keep only rows `keep` (in that order); drop columns no kept row uses any more."""
        if not keep:
            self._reset(0)
            return
        index = torch.tensor(keep, device=self.device)
        valid = self.valid.index_select(0, index)
        used = valid.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else self.end
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys = _copy_cols(layer.keys.index_select(0, index), first, self.end)
                layer.values = _copy_cols(layer.values.index_select(0, index), first, self.end)
        self.valid = valid[:, first:]
        self.lengths = self.lengths.index_select(0, index)
        self.end -= first

    def extend(self, rows: list[RowKV]) -> None:
        """Append rows after the existing ones, right-aligned at the batch's last column."""
        if not rows:
            return
        new_end = max(self.end, max(r.length for r in rows))
        shift = new_end - self.end
        b0, b = self.batch_size, self.batch_size + len(rows)
        for li, layer in enumerate(self.layers):
            for attr, parts in (("keys", [r.keys[li] for r in rows]), ("values", [r.values[li] for r in rows])):
                old = getattr(layer, attr) if layer.is_initialized else None
                h, d = parts[0].shape[0], parts[0].shape[2]
                buf = parts[0].new_zeros(b, h, new_end + HEADROOM, d)
                if old is not None and b0:
                    buf[:b0, :, shift:new_end] = old[:, :, : self.end]
                for j, part in enumerate(parts):
                    buf[b0 + j, :, new_end - part.shape[1]:new_end] = part
                setattr(layer, attr, buf)
            layer.is_initialized = True
        valid = torch.zeros(b, new_end, dtype=torch.bool, device=self.device)
        valid[:b0, shift:] = self.valid[:, : self.end]
        for j, r in enumerate(rows):
            valid[b0 + j, new_end - r.length:] = True
        self.valid = valid
        self.lengths = torch.cat([self.lengths, torch.tensor([r.length for r in rows], device=self.device)])
        self.end = new_end

    @classmethod
    def from_rows(cls, rows: list[RowKV | None], num_layers: int, device: torch.device | str) -> BatchKV:
        """A batch of these rows (None: a row with nothing cached yet)."""
        kv = cls(num_layers, 0, device)
        present = [r for r in rows if r is not None and r.length > 0]
        if not present:
            kv._reset(len(rows))
            return kv
        empty = RowKV([k[:, :0] for k in present[0].keys], [v[:, :0] for v in present[0].values])
        kv.extend([r if r is not None else empty for r in rows])
        return kv

    def _reset(self, batch_size: int) -> None:
        for layer in self.layers:
            layer.keys = layer.values = None
            layer.is_initialized = False
        self.end = 0
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=self.device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)

    def _layers(self) -> list[_LayerKV]:
        assert all(l.is_initialized for l in self.layers), "no keys or values cached yet"
        return self.layers


def _copy_cols(buf: torch.Tensor, first: int, end: int) -> torch.Tensor:
    out = buf.new_zeros(*buf.shape[:2], end - first + HEADROOM, buf.shape[3])
    out[:, :, : end - first] = buf[:, :, first:end]
    return out


def attention_mask(valid: torch.Tensor, window: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, W, K] for a window of the last W of K columns.

    Semantics: query q (column K - W + q) may attend to column k iff
        (valid[b, k] and k <= K - W + q)  or  k == K - W + q
    (the second clause gives padding queries one finite score; real queries are valid there).
    Allowed entries are 0, the others the dtype's most negative value.
    """
    b, k = valid.shape
    q_col = torch.arange(k - window, k, device=valid.device)  # [W]
    k_col = torch.arange(k, device=valid.device)  # [K]
    causal = k_col[None, :] <= q_col[:, None]  # [W, K]
    allowed = (valid[:, None, :] & causal[None]) | (k_col[None, :] == q_col[:, None])[None]  # [B, W, K]
    mask = torch.zeros(b, 1, window, k, dtype=dtype, device=valid.device)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
