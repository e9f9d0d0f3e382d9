"""Text generation with a causal language model (``transformer.CausalLM``), one token at a time.

    generate(model, prompt, max_new_tokens, ...)   one generation, its new tokens yielded as they come
    BatchedGenerator(model)                        many generations stepped together, one forward pass per
                                                   step for all of them (a server with concurrent clients)

Each step scores the next token from the context (the tokens the model sees), picks one (``sample``), and
appends it. With the key/value cache (``kv_cache.KVCache``) the context's keys and values are kept from
one step to the next, so a step feeds the model only the newest token; without it (``use_cache=False``,
the baseline) every step runs the whole context through the model again.

The context window. Positions are learned absolute embeddings, max_len of them, so the model can see at most
max_len tokens, and a cached key belongs to the position it was computed at: a window cannot slide by one
token without recomputing every key in it. The policy, the same with and without the cache so that both see
identical contexts:

  * the window starts as the last max_len tokens of the prompt;
  * each new token is appended to it while it holds fewer than max_len tokens;
  * a token that would make it longer restarts it: the window becomes the last max_len // 2 tokens
    (the new one included), which the cached path prefills into an emptied cache.

So the model always sees between max_len // 2 and max_len tokens once the generation is long, and the cached
path pays one prefill of max_len // 2 tokens every max_len // 2 + 1 steps.

With the cache, every step, batched or not, is the same: feed the window's last token, everything before
it being in the cache already (a prefill puts ``window[:-1]`` there when the window starts or restarts). The
step runs as ``kv_cache.DecodeStep`` (the modules' arithmetic without their Python costs), the prefill
through the modules. Sampling uses one ``torch.Generator`` per generation, so a generation's tokens depend on
its own arguments only, not on what else is stepped with it. (The cached and the full computation, and a row
computed in a batch or alone, can differ in the last bits of floating point; a token changes only if a
logit tie or a random draw falls within that distance, which the tests would show.)

Everything runs under ``torch.inference_mode``: no autograd, like ``torch.no_grad``, and also no
version-counter bookkeeping, which makes a step's many small operations ~15 % cheaper. The cache's tensors
are then inference tensors, so BatchedGenerator changes them only under inference mode too.
"""
from __future__ import annotations

import math
import operator
from collections import deque
from typing import Iterator, Sequence

import torch
from torch import nn

from modelworks.models.kv_cache import DecodeStep, KVCache
from modelworks.models.transformer import CausalLM


def generate(model: nn.Module, prompt: Sequence[int], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, random_seed: int | None = None, use_cache: bool = True) -> Iterator[int]:
    """Yields the new token ids one at a time (a generator, so callers can stream). temperature 0 = greedy
    (argmax); else softmax(logits / temperature), restricted to the top_k most likely when top_k is given,
    sampled with a torch.Generator seeded by random_seed (None = nondeterministic). use_cache=False
    recomputes the whole context each step (the baseline the bench compares against).

    The arguments are checked when it is called (ValueError), not at the first token. Puts the model in
    eval mode (no dropout); runs without autograd (inference mode), on the model's device."""
    lm = _causal_lm(model)
    sequence = Generation(lm, prompt, max_new_tokens, temperature, top_k, random_seed)
    return _generate(lm, sequence, use_cache)


@torch.inference_mode()  # on a generator function, torch applies it at every resume, not to the caller between yields
def _generate(lm: CausalLM, sequence: Generation, use_cache: bool) -> Iterator[int]:
    device = _device(lm)
    cache, step = (lm.new_cache(1), DecodeStep(lm)) if use_cache else (None, None)
    while sequence.remaining:
        if not use_cache:
            logits = lm.next_token_logits(torch.tensor([sequence.window], device=device))
        else:
            if sequence.needs_prefill:
                cache.clear()
                prefill(lm, cache, sequence.window[:-1])
                sequence.needs_prefill = False
            logits = step(torch.tensor([sequence.window[-1:]], device=device), cache)
        token = sequence.sample(logits[0])
        sequence.append(token)
        yield token


class BatchedGenerator:
    """Steps many generations together (what a server uses so that 16 concurrent clients do not queue
    behind one another): one forward pass per step for all active sequences.

    The active sequences are the rows of one KVCache. A sequence that joins (or whose window restarts) is
    prefilled on its own, its rows copied in; then every step feeds each row its own newest token at its
    own position. Each sequence samples with its own generator, so it yields the same tokens as
    ``generate`` with the same arguments. Not thread-safe: one caller adds, steps and cancels."""

    def __init__(self, model: nn.Module, max_batch: int = 32):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model, self.max_batch = _causal_lm(model), max_batch
        self.device = _device(self.model)
        self._step = DecodeStep(self.model)
        self._running: list[Generation] = []  # row i of self._cache is self._running[i]
        with torch.inference_mode():
            self._cache = self.model.new_cache(0)
        self._waiting: deque[Generation] = deque()  # added while max_batch sequences were running
        self._next_handle = 0

    def add(self, prompt: Sequence[int], max_new_tokens: int, *, temperature: float = 1.0,
            top_k: int | None = None, random_seed: int | None = None) -> int:
        """Queue a generation (arguments as ``generate``'s; max_new_tokens >= 1); returns its handle. It
        starts at the next step, or when a place frees up if max_batch sequences are running."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1 for a batched generation, got {max_new_tokens}")
        sequence = Generation(self.model, prompt, max_new_tokens, temperature, top_k, random_seed)
        sequence.handle, self._next_handle = self._next_handle, self._next_handle + 1
        self._waiting.append(sequence)
        return sequence.handle

    @torch.inference_mode()
    def step(self) -> list[tuple[int, int, bool]]:
        """One new token for every active sequence: (handle, token_id, finished); newly added sequences are
        prefilled first. A finished sequence is dropped. Returns [] when nothing is active."""
        self._admit()
        for row, sequence in enumerate(self._running):
            if sequence.needs_prefill:  # its window restarted at the last step
                one = self.model.new_cache(1)
                prefill(self.model, one, sequence.window[:-1])
                self._cache.replace_row(row, one)
                sequence.needs_prefill = False
        if not self._running:
            return []
        newest = torch.tensor([s.window[-1:] for s in self._running], device=self.device)
        logits = self._step(newest, self._cache)
        out = []
        for row, sequence in enumerate(self._running):
            token = sequence.sample(logits[row])
            sequence.append(token)
            out.append((sequence.handle, token, sequence.remaining == 0))
        if any(s.remaining == 0 for s in self._running):
            self._keep([row for row, s in enumerate(self._running) if s.remaining])
        return out

    @torch.inference_mode()  # the cache's tensors are inference tensors (see the module docstring)
    def cancel(self, handle: int) -> None:
        """A client went away: drop its sequence (a handle not active, e.g. already finished, is ignored)."""
        self._waiting = deque(s for s in self._waiting if s.handle != handle)
        if any(s.handle == handle for s in self._running):
            self._keep([row for row, s in enumerate(self._running) if s.handle != handle])

    @property
    def active(self) -> int:
        """Sequences active or waiting."""
        return len(self._running) + len(self._waiting)

    def _admit(self) -> None:
        """Move waiting sequences into the batch while there is room: prefill each, add its rows."""
        joining = []
        while self._waiting and len(self._running) + len(joining) < self.max_batch:
            sequence = self._waiting.popleft()
            one = self.model.new_cache(1)
            prefill(self.model, one, sequence.window[:-1])
            sequence.needs_prefill = False
            joining.append((sequence, one))
        for sequence, one in joining:
            self._cache.add_rows(one)
            self._running.append(sequence)

    def _keep(self, rows: list[int]) -> None:
        self._cache.keep_rows(rows)
        self._running = [self._running[row] for row in rows]


def prefill(lm: CausalLM, cache: KVCache, tokens: list[int]) -> None:
    """Run tokens through the model into an empty cache (one forward pass; their logits are not needed)."""
    if tokens:
        lm.encoder(torch.tensor([tokens], device=cache.device), causal=True, cache=cache)


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> int:
    """One token id from next-token logits (vocab,): argmax at temperature 0; else a draw from
    softmax(logits / temperature) over the top_k highest-scoring tokens (all when top_k is None)."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.numel():
        top, ids = torch.topk(logits, top_k)
        return int(ids[torch.multinomial(torch.softmax(top, dim=-1), 1, generator=generator)])
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


class Generation:
    """One generation's state: its context window, how many tokens are still to come, how it samples."""

    def __init__(self, lm: CausalLM, prompt: Sequence[int], max_new_tokens: int, temperature: float,
                 top_k: int | None, random_seed: int | None):
        vocab_size, max_len = lm.encoder.tok.num_embeddings, lm.encoder.max_len
        tokens = _token_list(prompt, vocab_size)
        if operator.index(max_new_tokens) < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if not (temperature >= 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        if top_k is not None and operator.index(top_k) < 1:
            raise ValueError(f"top_k must be at least 1 (or None for no limit), got {top_k}")
        self.window = tokens[-max_len:]
        self.max_len, self.restart_len = max_len, max(1, max_len // 2)
        self.needs_prefill = True  # the cache does not hold window[:-1] yet
        self.remaining, self.temperature, self.top_k = max_new_tokens, temperature, top_k
        self.generator = torch.Generator(device=_device(lm))
        if random_seed is None:
            self.generator.seed()  # from the operating system's entropy
        else:
            self.generator.manual_seed(random_seed)
        self.handle = -1  # set by BatchedGenerator.add

    def sample(self, logits: torch.Tensor) -> int:
        return sample(logits, self.temperature, self.top_k, self.generator)

    def append(self, token: int) -> None:
        """Add a generated token to the window, restarting the window when it is full (module docstring)."""
        self.remaining -= 1
        if len(self.window) < self.max_len:
            self.window.append(token)
        else:
            self.window = (self.window + [token])[-self.restart_len:]
            self.needs_prefill = True


def _token_list(prompt: Sequence[int], vocab_size: int) -> list[int]:
    try:
        tokens = [operator.index(t) for t in prompt]
    except TypeError:
        raise ValueError("prompt must be a sequence of integer token ids") from None
    if not tokens:
        raise ValueError("prompt is empty: generation needs at least one token to continue from")
    bad = next((t for t in tokens if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompt token {bad} is outside the vocabulary (0..{vocab_size - 1})")
    return tokens


def _causal_lm(model: nn.Module) -> CausalLM:
    if not isinstance(model, CausalLM):
        raise ValueError(f"generation needs a causal language model (transformer head 'lm'), got "
                         f"{type(model).__name__}")
    return model.eval()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
