"""The Transformer's generation-time pieces (see ``transformer.py``): the key/value cache and the decode step.

A language model writes one token at a time, and every new token's step needs the keys and values of all
the positions before it. Those never change once computed (a position only attends to itself and earlier
ones), so a ``KVCache`` keeps them: one preallocated buffer per layer, (batch, heads, max_len, d_k) for keys
and the same for values. The first pass over the prompt (the prefill) fills it; after that each step feeds
only the newest token, which attends to the cached positions plus itself, so a step costs one position
instead of the whole prefix. That one query may look at every key, so it needs no mask at all. Writes go
into the buffers in place (``torch.cat`` would copy the whole cache every step). Rows of a batch may hold
different numbers of positions (generations with prompts of different lengths stepped together); each row
then gets its own positions and a mask that hides the keys it does not have. A cache holds at most max_len
positions, since positions are learned absolute embeddings; what generation does when a context outgrows
that is ``modelworks.models.generation``'s policy.

The cache lives outside the model, which holds no generation state: ``CausalLM.new_cache(batch_size)``
makes one, ``Encoder.forward(ids, causal=True, cache=cache)`` places the new tokens after what it holds,
and each layer's attention writes its keys and values through its ``LayerCache``. ``DecodeStep`` is the
one-token step written out without the modules (its docstring says why).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from modelworks.models.transformer import CausalLM, Encoder


class KVCache:
    """The keys and values a causal language model has computed for the positions it has seen, so that the
    next step computes only its new positions (see the module docstring).

    One buffer per layer for keys and one for values, (batch, heads, max_len, d_k), allocated once; row b
    holds ``lengths[b]`` positions. The lengths are kept on the host: which path a step takes (every row at
    the same position, or not) is decided without waiting for the device."""

    def __init__(self, encoder: Encoder, batch_size: int):
        attn = encoder.blocks[0].attn
        weight = encoder.tok.weight
        self.max_len, self.device = encoder.max_len, weight.device
        shape = (batch_size, attn.n_heads, encoder.max_len, attn.d_k)
        # Zeros, not torch.empty: a masked-out key still enters the product (with weight 0), and 0 * NaN is NaN.
        self.keys = [torch.zeros(shape, dtype=weight.dtype, device=self.device) for _ in encoder.blocks]
        self.values = [torch.zeros(shape, dtype=weight.dtype, device=self.device) for _ in encoder.blocks]
        self.layers = [LayerCache(self, i) for i in range(len(encoder.blocks))]
        self.lengths = [0] * batch_size
        self.arange = torch.arange(encoder.max_len, device=self.device)  # positions, sliced rather than rebuilt
        # Set by start() for the forward pass under way: where its new positions go (from position _start in
        # every row, or at _rows, _positions when rows differ), and how many keys the attention reads (_span:
        # the longest row's count after the pass).
        self._start: int | None = 0
        self._rows = self._positions = None
        self._span = 0

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def clear(self) -> None:
        """Empty every row (the buffers stay: what they hold lies past the lengths and is never read)."""
        self.lengths = [0] * len(self.lengths)

    def start(self, T: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prepare a forward pass adding T positions to every row: (the new positions, the attention mask)."""
        if max(self.lengths) + T > self.max_len:
            raise ValueError(f"the cache holds {max(self.lengths)} positions; {T} more would pass "
                             f"max_len={self.max_len}")
        first = self.lengths[0]
        if all(n == first for n in self.lengths):
            # Every row at the same position (always so for a single generation): the new positions are one
            # slice, and the causal rule (mask None) is all the attention needs.
            self._start, self._span = first, first + T
            return self.arange[first:first + T], None
        # Rows at different positions: each row's own positions (B, T), and a mask (B, 1, T, S) letting each
        # query see its row's keys up to its own position, and not the unused slots of shorter rows.
        lengths = torch.tensor(self.lengths, device=self.device)
        positions = lengths[:, None] + self.arange[:T]
        self._start, self._span = None, max(self.lengths) + T
        self._rows, self._positions = torch.arange(len(self.lengths), device=self.device)[:, None], positions
        allowed = self.arange[None, None, :self._span] <= positions[:, :, None]
        return positions, allowed[:, None]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a layer's new keys and values (B, heads, T, d_k) at the slots start() chose; returns all the
        keys and values the attention reads (B, heads, S, d_k)."""
        keys, values = self.keys[layer], self.values[layer]
        if self._start is not None:  # narrow + copy_ rather than indexing: fewer operations, see DecodeStep
            keys.narrow(2, self._start, k.shape[2]).copy_(k)
            values.narrow(2, self._start, v.shape[2]).copy_(v)
        else:  # indexing (rows, :, positions) addresses (B, T, heads, d_k)
            keys[self._rows, :, self._positions] = k.transpose(1, 2)
            values[self._rows, :, self._positions] = v.transpose(1, 2)
        return keys.narrow(2, 0, self._span), values.narrow(2, 0, self._span)

    def finish(self, T: int) -> None:
        self.lengths = [n + T for n in self.lengths]

    # Changing which rows the cache holds (a batch of generations that start and finish at different times).
    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows, in this order (a copy of the buffers: rows leave rarely, steps are many)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.keys = [t.index_select(0, index) for t in self.keys]
        self.values = [t.index_select(0, index) for t in self.values]
        self.lengths = [self.lengths[r] for r in rows]

    def add_rows(self, other: KVCache) -> None:
        """Append another cache's rows after this one's."""
        self.keys = [torch.cat([a, b]) for a, b in zip(self.keys, other.keys)]
        self.values = [torch.cat([a, b]) for a, b in zip(self.values, other.values)]
        self.lengths = self.lengths + other.lengths

    def replace_row(self, row: int, other: KVCache) -> None:
        """Overwrite one row with a one-row cache (a generation whose context was restarted)."""
        for mine, theirs in zip(self.keys + self.values, other.keys + other.values):
            mine[row] = theirs[0]
        self.lengths[row] = other.lengths[0]


class LayerCache:
    """One layer's share of a KVCache: what that layer's attention writes its new keys and values to."""

    def __init__(self, cache: KVCache, layer: int):
        self.cache, self.layer = cache, layer

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.append(self.layer, k, v)


class DecodeStep:
    """A generation step of a CausalLM (in eval mode) with a KVCache: ``step = DecodeStep(lm)``, then
    ``step(ids, cache)`` with one new token per row, ids (B, 1), returns next-token logits (B, vocab) exactly
    as ``lm.next_token_logits(ids, cache)`` does, operation for operation (a test holds the two bit for bit
    equal), but written with torch.nn.functional on weights looked up once instead of through the modules.

    Why: one position is little arithmetic, so a step's time goes mostly to per-operation overhead, and the
    modules add a lot of it in Python: each module call passes through nn.Module.__call__, and each
    ``self.qkv`` or ``.weight`` on a module is a call to nn.Module.__getattr__ (about a hundred per step). At
    the Tiny Shakespeare size (4 layers, d_model 128) on the project's 2-core CPU, a step through the modules
    takes ~1.7 times as long as this one (bench/lm_generate.py prints both). Only this step, repeated for
    every generated token, is written out; prompts (prefill) and training go through the modules. It holds
    the model's parameter tensors: in-place updates (load_state_dict, optimizer steps) show, a parameter
    replaced by a new object does not (make a new DecodeStep then)."""

    def __init__(self, lm: CausalLM):
        enc = lm.encoder

        def layer_norm(m: nn.LayerNorm) -> tuple:  # F.layer_norm's arguments after the input
            return m.normalized_shape, m.weight, m.bias, m.eps

        self.tok, self.pos, self.ln_f = enc.tok.weight, enc.pos.weight, layer_norm(enc.ln_f)
        self.layers = [(layer_norm(b.ln1), b.attn.qkv.weight, b.attn.qkv.bias, b.attn.n_heads, b.attn.d_k,
                        b.attn.fused_attend if b.attn.use_sdpa else b.attn.attend, b.attn.out.weight, b.attn.out.bias,
                        layer_norm(b.ln2), b.ffn.up.weight, b.ffn.up.bias, b.ffn.down.weight, b.ffn.down.bias)
                       for b in enc.blocks]

    def __call__(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        B, C = ids.shape[0], self.tok.shape[1]
        positions, allowed = cache.start(1)
        x = F.embedding(ids, self.tok) + F.embedding(positions, self.pos)  # Encoder.forward
        for layer, (ln1, w_qkv, b_qkv, heads, d_k, attend, w_out, b_out, ln2, w_up, b_up, w_down, b_down) \
                in enumerate(self.layers):
            # Block.forward, with MultiHeadSelfAttention.forward and FeedForward.forward inlined
            qkv = F.linear(F.layer_norm(x, *ln1), w_qkv, b_qkv)
            q, k, v = qkv.view(B, 1, 3, heads, d_k).permute(2, 0, 3, 1, 4).unbind(0)
            k, v = cache.append(layer, k, v)
            x = x + F.linear(attend(q, k, v, allowed).transpose(1, 2).reshape(B, 1, C), w_out, b_out)
            x = x + F.linear(F.gelu(F.linear(F.layer_norm(x, *ln2), w_up, b_up)), w_down, b_down)
        cache.finish(1)
        return F.layer_norm(x, *self.ln_f)[:, -1] @ self.tok.T  # CausalLM.next_token_logits
