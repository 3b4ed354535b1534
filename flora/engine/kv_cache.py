"""The paged KV cache: one preallocated pool of fixed-size blocks per layer, and who owns which block.

    pool = KVPool.allocate(num_layers, num_blocks, block_size, kv_heads, head_dim, dtype, device)
    blocks = BlockManager(num_blocks, block_size)

Every layer's keys and values live in `[num_blocks, kv_heads, block_size, head_dim]` tensors,
allocated once. A sequence owns a list of blocks (its block table): token `p` of the sequence
sits in block `table[p // block_size]` at offset `p % block_size`. Sequences joining or leaving
a batch copy no keys or values; they take blocks from, and give them back to, the free list.

Prefix caching: once a block is full, its contents are a function of the tokens up to its end
and of the adapter they were computed under, so the block is registered under a digest of
exactly that (`block_digest`: the previous block's digest, the adapter's load id, the block's
tokens). A later sequence with the same adapter load and the same leading tokens reuses the
block (reference counted); the same tokens under another adapter, or another load of the same
adapter, never match. Freed blocks keep their digest until they are handed out again, least
recently freed first, so a prefix stays reusable for as long as memory allows.

Block 0 is never handed out: it is where padding tokens (e.g. of a CUDA-graph batch bucket)
write, so that they touch no sequence's keys.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

SCRATCH_BLOCK = 0


def block_digest(parent: bytes, adapter_key: int, tokens: Sequence[int]) -> bytes:
    """The identity of a full block: everything its keys and values depend on.

    A cryptographic hash, so that no prompt can be crafted to collide with another's block.
    """
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(adapter_key.to_bytes(8, "little", signed=True))
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return h.digest()


class BlockManager:
    """The free list, reference counts and prefix cache of a pool of `num_blocks` blocks."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks}: need at least 2 (block 0 is reserved for padding)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._refs = [0] * num_blocks
        self._digest: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # digest -> block holding it
        # Free blocks in the order they were freed: handed out oldest first, so that recently
        # freed (recently used) cached prefixes survive longest.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self.hits = 0  # blocks reused from the prefix cache

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, count: int) -> list[int]:
        """`count` fresh blocks (reference 1); the caller checked `free_blocks` first."""
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} KV blocks, {len(self._free)} free")
        out = []
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            digest = self._digest[block]
            if digest is not None:  # evict the cached prefix this block held
                self._digest[block] = None
                if self._cached.get(digest) == block:
                    del self._cached[digest]
            self._refs[block] = 1
            out.append(block)
        return out

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; unreferenced blocks go to the end of the free list."""
        for block in blocks:
            self._refs[block] -= 1
            assert self._refs[block] >= 0, block
            if self._refs[block] == 0:
                self._free[block] = None

    def match(self, digests: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `digests`, each with a reference taken."""
        if not self.prefix_caching:
            return []
        out = []
        for digest in digests:
            block = self._cached.get(digest)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
            out.append(block)
        self.hits += len(out)
        return out

    def register(self, block: int, digest: bytes) -> None:
        """Record that `block` is full and holds `digest`'s keys and values."""
        if self.prefix_caching and digest not in self._cached and self._digest[block] is None:
            self._cached[digest] = block
            self._digest[block] = digest

    def refcount(self, block: int) -> int:
        return self._refs[block]


@dataclass
class KVPool:
    """Per layer, keys and values: `[num_blocks, kv_heads, block_size, head_dim]`."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def allocate(cls, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> KVPool:
        shape = (num_blocks, kv_heads, block_size, head_dim)
        return cls(
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
        )

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
