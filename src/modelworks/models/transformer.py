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

A language model generates with a key/value cache (``kv_cache.py``: ``KVCache``, ``DecodeStep``), which
lives outside the model: ``CausalLM.new_cache(batch_size)`` makes one, ``Encoder.forward(ids, causal=True,
cache=cache)`` places the new tokens after what it holds, and each layer's attention writes its keys and
values through its ``LayerCache``. Training passes no cache.

A model spec (``model.json`` in every checkpoint) rebuilds the network:
``{"name": "transformer", "head": "mlm" | "classify" | "lm", "vocab_size", "max_len", "d_model", "n_layers",
"n_heads", "d_ff", "dropout", "pad_id", "num_classes", "pooling", "use_sdpa"}``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from modelworks.models.kv_cache import KVCache, LayerCache

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
