"""The Transformer, as the founding document describes it, top to bottom.

    tokens ──► token embedding + learned position embedding ──► dropout
           ──► N × Block:   x = x + Attention(LayerNorm(x))        (pre-LayerNorm residual)
                            x = x + FeedForward(LayerNorm(x))
           ──► final LayerNorm ──► a head:
                 MaskedLM            predicts the hidden token at each masked position (pre-training)
                 SequenceClassifier  one label per sequence (fine-tuning: sentiment, topics, ...)
                 CausalLM            predicts each next token from the ones before it (generation, GPT)

Attention is ``softmax(Q Kᵀ / √d_k) V`` per head, written out in ``MultiHeadSelfAttention.attend``; the
fused ``torch.nn.functional.scaled_dot_product_attention`` computes the same thing faster and is used when
``use_sdpa`` is true (a test checks the two agree). A padding mask keeps every position from attending to
padding; an optional causal mask keeps it from attending to later positions (language modelling). A
language model's windows hold no padding (``pad_id`` None): its mask is the causal one alone, which the
fused path applies without building a (T, T) mask tensor.

Generation and the key/value cache. A language model writes one token at a time, and every new token's
step needs the keys and values of all the positions before it. Those never change once computed (a
position only attends to itself and earlier ones), so a ``KVCache`` keeps them: one preallocated buffer per
layer, (batch, heads, max_len, d_k) for keys and the same for values. The first pass over the prompt (the
prefill) fills it; after that each step feeds only the newest token, which attends to the cached positions
plus itself, so a step costs one position instead of the whole prefix. That one query may look at every
key, so it needs no mask at all. Writes go into the buffers in place (``torch.cat`` would copy the whole
cache every step). Rows of a batch may hold different numbers of positions (generations with prompts of
different lengths stepped together); each row then gets its own positions and a mask that hides the keys
it does not have. A cache holds at most max_len positions, since positions are learned absolute
embeddings; what generation does when a context outgrows that is ``modelworks.models.generation``'s policy.

The cache lives outside the model, which holds no generation state: ``CausalLM.new_cache(batch_size)``
makes one, ``Encoder.forward(ids, causal=True, cache=cache)`` places the new tokens after what it holds,
and each layer's attention writes its keys and values through its ``LayerCache``. Training passes no
cache and takes the path it always took. ``DecodeStep`` is the one-token step written out without the
modules (its docstring says why).

A model spec (``model.json`` in every checkpoint) rebuilds the network:
``{"name": "transformer", "head": "mlm" | "classify" | "lm", "vocab_size", "max_len", "d_model", "n_layers",
"n_heads", "d_ff", "dropout", "pad_id", "num_classes", "pooling", "use_sdpa"}``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Initial weights ~ N(0, 0.02): BERT's and GPT-2's choice; it keeps early activations and logits small.
INIT_STD = 0.02
# Positions labelled with this value take no part in a loss (PyTorch's cross_entropy default ignore_index).
IGNORE_INDEX = -100


class MultiHeadSelfAttention(nn.Module):
    """Each head projects x to queries, keys and values of width d_k = d_model / n_heads, mixes the values
    by softmax(Q Kᵀ / √d_k), and the heads' outputs are concatenated and projected back to d_model."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, use_sdpa: bool = True):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads, self.d_k = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)  # W_Q, W_K, W_V of all heads in one matrix
        self.out = nn.Linear(d_model, d_model)      # W_O
        self.dropout = dropout
        self.use_sdpa = use_sdpa

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        """The written-out attention. q: (B, heads, T, d_k); k, v: (B, heads, S, d_k), S >= T (S > T when a
        cache holds earlier positions: the queries are the last T of the S); allowed: bool (B, 1, T, S),
        True where a query may look at a key (None: causal only). Returns (B, heads, T, d_k)."""
        if allowed is None:
            allowed = causal_mask(q.shape[-2], k.shape[-2], q.device)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_k)  # (B, heads, T, S): how well each q matches each k
        scores = scores.masked_fill(~allowed, float("-inf"))    # softmax gives forbidden keys weight 0
        weights = torch.softmax(scores, dim=-1)
        weights = F.dropout(weights, self.dropout, self.training)
        return weights @ v

    def fused_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     allowed: torch.Tensor | None) -> torch.Tensor:
        """The same as ``attend``, by ``scaled_dot_product_attention``. Causal only (allowed None) needs no
        mask tensor in the two common cases: training (S == T: SDPA's ``is_causal``) and a generation step
        (one query, the newest position, which may look at every key)."""
        T, S = q.shape[-2], k.shape[-2]
        is_causal = allowed is None and T > 1
        if is_causal and S != T:  # SDPA's is_causal lines the queries up with the *first* T keys, not the last
            allowed, is_causal = causal_mask(T, S, q.device), False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=is_causal,
                                              dropout_p=self.dropout if self.training else 0.0)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor | None, cache: LayerCache | None = None) -> torch.Tensor:
        """x: (B, T, d_model). With a cache, x holds only the new positions: their keys and values are
        written to it, and the queries attend to everything it holds."""
        B, T, C = x.shape
        # (B, T, 3·d_model) -> q, k, v, each (B, heads, T, d_k): views of the projection, no copies
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.d_k).permute(2, 0, 3, 1, 4).unbind(0)
        if cache is not None:
            k, v = cache.append(k, v)
        y = self.fused_attend(q, k, v, allowed) if self.use_sdpa else self.attend(q, k, v, allowed)
        y = y.transpose(1, 2).reshape(B, T, C)  # concatenate the heads
        return self.out(y)


def causal_mask(T: int, S: int, device: torch.device) -> torch.Tensor:
    """bool (T, S): the T queries are the last T of S positions, and each may look at keys up to its own."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


class FeedForward(nn.Module):
    """Position-wise: the same two-layer MLP (d_model -> d_ff -> d_model, GELU) applied at every position."""

    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.up, self.down = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.drop(F.gelu(self.up(x))))


class Block(nn.Module):
    """Pre-LayerNorm residual block: normalising before each sub-layer (not after, as the 2017 paper did)
    keeps gradients well scaled without a long warm-up, which matters for small models trained briefly."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, use_sdpa: bool):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = MultiHeadSelfAttention(d_model, n_heads, dropout, use_sdpa)
        self.ffn = FeedForward(d_model, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor | None, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), allowed, cache))
        return x + self.drop(self.ffn(self.ln2(x)))


class Encoder(nn.Module):
    """Embeddings + blocks + final LayerNorm: token ids (B, T) -> one vector per position (B, T, d_model)."""

    def __init__(self, vocab_size: int, max_len: int, d_model: int, n_layers: int, n_heads: int, d_ff: int,
                 dropout: float, pad_id: int | None = 0, use_sdpa: bool = True):
        super().__init__()
        self.pad_id, self.max_len = pad_id, max_len
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)  # learned positions, as in BERT and GPT
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff, dropout, use_sdpa) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)

    def attention_mask(self, ids: torch.Tensor, causal: bool) -> torch.Tensor | None:
        """bool (B, 1, T, T): query i may attend to key j when j is a real token (and j <= i if causal).
        None for a causal model without padding: the attention applies the causal mask itself."""
        if self.pad_id is None:
            if not causal:
                raise ValueError("an encoder without pad_id is a language model's: call it with causal=True")
            return None
        allowed = (ids != self.pad_id)[:, None, None, :]
        if causal:
            T = ids.shape[1]
            allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
        return allowed

    def forward(self, ids: torch.Tensor, causal: bool = False, cache: KVCache | None = None) -> torch.Tensor:
        """ids (B, T) -> (B, T, d_model). With a cache (causal language models only), ids are the next T
        tokens of each row: they take the positions after the ones the cache holds and are added to it."""
        T = ids.shape[1]
        if cache is None:
            if T > self.max_len:
                raise ValueError(f"sequence of {T} tokens is longer than max_len={self.max_len}")
            positions = torch.arange(T, device=ids.device)
            allowed = self.attention_mask(ids, causal)
        else:
            if self.pad_id is not None or not causal:
                raise ValueError("a key/value cache is for a causal language model (pad_id None, causal=True)")
            positions, allowed = cache.start(T)
        x = self.drop(self.tok(ids) + self.pos(positions))
        for layer, block in enumerate(self.blocks):
            x = block(x, allowed, None if cache is None else cache.layers[layer])
        if cache is not None:
            cache.finish(T)
        return self.ln_f(x)


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


def init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class MaskedLM(nn.Module):
    """Pre-training head: at each masked position, a transform (dense, GELU, LayerNorm, as in BERT) then
    scores over the vocabulary with the token embedding matrix itself (tied weights: fewer parameters,
    and the input and output views of a token are trained together)."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder
        d_model = encoder.tok.embedding_dim
        self.transform = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.LayerNorm(d_model))
        self.bias = nn.Parameter(torch.zeros(encoder.tok.num_embeddings))
        self.apply(init_weights)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (N, vocab) for the N positions whose label is not IGNORE_INDEX (all when labels is None).
        Scoring only the ~15 % masked positions saves most of the vocabulary projection's cost."""
        h = self.encoder(ids)
        h = h[labels != IGNORE_INDEX] if labels is not None else h.reshape(-1, h.shape[-1])
        return self.transform(h) @ self.encoder.tok.weight.T + self.bias


class SequenceClassifier(nn.Module):
    """Fine-tuning head: pool the encoder's vectors into one per sequence, then a linear layer to classes.
    ``pooling="mean"`` averages the real (non-padding) positions; ``"cls"`` takes the first token's vector."""

    def __init__(self, encoder: Encoder, num_classes: int, dropout: float, pooling: str = "mean"):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.encoder, self.pooling = encoder, pooling
        d_model = encoder.tok.embedding_dim
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(d_model, num_classes)
        self.apply(init_weights)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.encoder(ids)
        if self.pooling == "cls":
            pooled = h[:, 0]
        else:
            real = (ids != self.encoder.pad_id).unsqueeze(-1).to(h.dtype)
            pooled = (h * real).sum(1) / real.sum(1).clamp(min=1.0)
        return self.classifier(self.drop(pooled))


class CausalLM(nn.Module):
    """Generation head (decoder-only, as GPT): every position attends only to itself and earlier ones, and
    its vector scores the next token over the vocabulary with the token embedding matrix (tied weights, as
    in MaskedLM; no bias, as in GPT-2)."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder
        self.apply(init_weights)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits: (N, vocab) for the positions whose label is not IGNORE_INDEX when ``labels``
        (B, T) is given (training), else (B, T, vocab)."""
        h = self.encoder(ids, causal=True)
        if labels is not None:
            h = h[labels != IGNORE_INDEX]
        return h @ self.encoder.tok.weight.T

    def next_token_logits(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """(B, vocab): scores for the token after each row's last one. Without a cache, ids are the whole
        context; with one, ids are the tokens after what it holds (and are added to it). Only the last
        position is projected onto the vocabulary: generation needs no other."""
        h = self.encoder(ids, causal=True, cache=cache)
        return h[:, -1] @ self.encoder.tok.weight.T

    def new_cache(self, batch_size: int = 1) -> KVCache:
        return KVCache(self.encoder, batch_size)


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


def build(spec: dict) -> nn.Module:
    """The network a spec describes (weights freshly initialised)."""
    encoder = Encoder(spec["vocab_size"], spec["max_len"], spec["d_model"], spec["n_layers"], spec["n_heads"],
                      spec["d_ff"], spec.get("dropout", 0.1), spec.get("pad_id", 0), spec.get("use_sdpa", True))
    if spec["head"] == "mlm":
        return MaskedLM(encoder)
    if spec["head"] == "classify":
        return SequenceClassifier(encoder, spec["num_classes"], spec.get("dropout", 0.1), spec.get("pooling", "mean"))
    if spec["head"] == "lm":
        return CausalLM(encoder)
    raise ValueError(f"unknown transformer head {spec['head']!r} (known: mlm, classify, lm)")
