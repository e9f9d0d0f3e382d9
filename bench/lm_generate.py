"""Text generation speed (new tokens/s), side by side in one run on one machine, then ratios:

  cache       generate(): the key/value cache, one new position per step
  no_cache    generate(use_cache=False): the whole context through the model again at every step
  batched     16 generations stepped together by BatchedGenerator (one forward pass per step for all)
  sequential  the same 16 generations as generate() calls one after another (what a server without
              batching does: each client waits for the ones before it)

The model is the Tiny Shakespeare language model's size (character vocabulary 65, max_len 64, d_model 128,
4 layers, 4 heads, d_ff 512) with random weights, or a trained one (--checkpoint DIR, loaded by
modelworks.checkpoint.load). Speed does not depend on the weights: every token costs the same work, whichever
token it is. Contexts longer than max_len follow generation.py's window policy (restart from the last
max_len // 2 tokens), the same for every variant.

cache vs no_cache generate --new-tokens greedily from one prompt, alternating for --repeats rounds; a
figure is the median round, and a ratio the median of the rounds' ratios (each round's two runs are
neighbours in time, so a busy spell on the machine hits both). They must yield the same tokens (checked,
and written to the JSON). batched vs sequential generate --batch-new-tokens from --batch prompts of
different lengths, each sampled (temperature 0.8) with its own seed; both must yield the same tokens too.
torch uses --threads intra-op threads throughout (1 by default: generating one token at a time is a chain
of small operations, which threads only slow down by waiting on each other).

Then where a step's time goes (microseconds, the best of several timings): the full forward pass that
no_cache runs per token at contexts of max_len/2, 3/4 and all of max_len; the cached step through the
modules (CausalLM.next_token_logits with the cache) and as DecodeStep (what generate runs); the prefill
that each window restart costs; and sampling one token.

    .venv/bin/python bench/lm_generate.py
    .venv/bin/python bench/lm_generate.py --checkpoint RUN_DIR/checkpoint_epoch=N     # a trained model

The target: cache >= 3x no_cache tokens/s at 500 new tokens on the project's 2-core CPU. On a machine
shared with other jobs the figures are noisy: compare ratios from the same run only.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # runs from a checkout without `pip install -e .` too

from modelworks.models import build_model  # noqa: E402
from modelworks.models.generation import BatchedGenerator, generate, sample  # noqa: E402
from modelworks.models.kv_cache import DecodeStep  # noqa: E402

SHAKESPEARE_SPEC = {"name": "transformer", "head": "lm", "vocab_size": 65, "max_len": 64, "d_model": 128,
                    "n_layers": 4, "n_heads": 4, "d_ff": 512, "dropout": 0.0, "pad_id": None, "use_sdpa": True}
TARGET_CACHE_VS_NO_CACHE = 3.0
BATCH_TEMPERATURE = 0.8


def timed(run) -> tuple[object, float]:
    """(run()'s result, seconds)."""
    t0 = time.perf_counter()
    out = run()
    return out, time.perf_counter() - t0


def side_by_side(variants: dict, tokens: int, repeats: int, label: str) -> dict:
    """Run each variant (name -> a function returning its tokens) once per round, for `repeats` rounds."""
    results: dict = {name: {"rates": []} for name in variants}
    outputs = {}
    for _ in range(repeats):
        for name, run in variants.items():
            outputs[name], seconds = timed(run)
            results[name]["rates"].append(tokens / seconds)
            print(f"    {name:>10}: {tokens / seconds:8.0f} tokens/s{label}", flush=True)
    for r in results.values():
        r["tokens_per_s"] = statistics.median(r["rates"])
    first, second = variants
    results["ratio"] = statistics.median(a / b for a, b in zip(results[first]["rates"], results[second]["rates"]))
    results["same_tokens"] = outputs[first] == outputs[second]
    return results


def bench_single(model, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    list(generate(model, prompt, 20, temperature=0))  # warm-up: first-call allocations

    def run(use_cache: bool) -> list[int]:
        return list(generate(model, prompt, new_tokens, temperature=0, use_cache=use_cache))

    return side_by_side({"cache": lambda: run(True), "no_cache": lambda: run(False)}, new_tokens, repeats, "")


def bench_batched(model, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    def batched() -> list[list[int]]:
        generator = BatchedGenerator(model, max_batch=len(prompts))
        handles = [generator.add(p, new_tokens, temperature=BATCH_TEMPERATURE, random_seed=i)
                   for i, p in enumerate(prompts)]
        got: dict[int, list[int]] = {h: [] for h in handles}
        while generator.active:
            for handle, token, _ in generator.step():
                got[handle].append(token)
        return [got[h] for h in handles]

    def sequential() -> list[list[int]]:
        return [list(generate(model, p, new_tokens, temperature=BATCH_TEMPERATURE, random_seed=i))
                for i, p in enumerate(prompts)]

    return side_by_side({"batched": batched, "sequential": sequential}, len(prompts) * new_tokens, repeats,
                        f"   ({len(prompts)} sequences)")


def best_us(run, calls: int = 20, timings: int = 15) -> float:
    """The best of `timings` timings of `calls` calls, in microseconds per call: the best is the one least
    disturbed by other jobs on the machine."""
    best = float("inf")
    for _ in range(timings):
        t0 = time.perf_counter()
        for _ in range(calls):
            run()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


@torch.inference_mode()
def breakdown(model) -> dict:
    """Where a generation step's time goes (see the module docstring)."""
    max_len, vocab = model.encoder.max_len, model.encoder.tok.num_embeddings
    ids = torch.randint(0, vocab, (1, max_len), generator=torch.Generator().manual_seed(0))
    out = {f"full_forward_context_{n}": best_us(lambda n=n: model.next_token_logits(ids[:, :n]), calls=5)
           for n in (max_len // 2, 3 * max_len // 4, max_len)}
    cache, step, context = model.new_cache(1), DecodeStep(model), 3 * max_len // 4 - 1
    model.next_token_logits(ids[:, :context], cache)

    def cached(through_modules: bool) -> None:
        cache.lengths = [context]  # the same position every time
        if through_modules:
            model.next_token_logits(ids[:, context:context + 1], cache)
        else:
            step(ids[:, context:context + 1], cache)

    out["cached_step_through_modules"] = best_us(lambda: cached(True))
    out["cached_step_decode_step"] = best_us(lambda: cached(False))
    restart = max(1, max_len // 2 - 1)  # a restart prefills the new window but its last token

    def prefill() -> None:
        cache.clear()
        model.encoder(ids[:, :restart], causal=True, cache=cache)

    out[f"prefill_{restart}_tokens"] = best_us(prefill, calls=5)
    logits, g = torch.randn(vocab), torch.Generator().manual_seed(0)
    out["sample_greedy"] = best_us(lambda: sample(logits, 0.0, None, g), calls=100)
    out["sample_temperature"] = best_us(lambda: sample(logits, 0.8, None, g), calls=100)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a trained language model's checkpoint folder")
    p.add_argument("--new-tokens", type=int, default=500, help="tokens generated in the cache vs no-cache rounds")
    p.add_argument("--batch", type=int, default=16, help="sequences in the batched vs sequential rounds")
    p.add_argument("--batch-new-tokens", type=int, default=500, help="tokens generated per batched sequence")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt length (batched prompts: 8 to 2x this)")
    p.add_argument("--repeats", type=int, default=5, help="rounds; figures are medians over them")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--random-seed", type=int, default=0, help="random weights and prompts")
    p.add_argument("--out", default=str(REPO / "bench/results/lm_generate.json"))
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.random_seed)
    if args.checkpoint:
        from modelworks.checkpoint import load

        loaded = load(args.checkpoint)
        model, spec = loaded.model, loaded.spec
    else:
        spec = SHAKESPEARE_SPEC
        model = build_model(spec)
    model.eval()
    vocab = spec["vocab_size"]
    g = torch.Generator().manual_seed(args.random_seed)
    prompt = torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist()
    lengths = torch.linspace(8, 2 * args.prompt_len, args.batch).round().long().tolist()  # different lengths
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]

    results: dict = {"spec": spec, "checkpoint": args.checkpoint, "threads": args.threads, "cpus": os.cpu_count(),
                     "new_tokens": args.new_tokens, "batch_new_tokens": args.batch_new_tokens,
                     "prompt_len": args.prompt_len, "repeats": args.repeats,
                     "load_avg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}
    print(f"model: vocab {vocab}, max_len {spec['max_len']}, d_model {spec['d_model']}, {spec['n_layers']} layers"
          f" ({'trained: ' + args.checkpoint if args.checkpoint else 'random weights'}); {args.threads} thread(s);"
          f" load average {results['load_avg_at_start']}", flush=True)
    print(f"one generation, {args.new_tokens} new tokens (greedy):", flush=True)
    results["single"] = bench_single(model, prompt, args.new_tokens, args.repeats)
    print(f"{args.batch} generations, {args.batch_new_tokens} new tokens each (temperature {BATCH_TEMPERATURE}):",
          flush=True)
    results["batch"] = bench_batched(model, prompts, args.batch_new_tokens, args.repeats)

    print("where a step's time goes (microseconds, best of several timings):", flush=True)
    results["step_us"] = breakdown(model)
    for k, v in results["step_us"].items():
        print(f"    {k:>32}: {v:8.0f}")

    single, batch = results["single"], results["batch"]
    results["ratios"] = {"cache_vs_no_cache": single["ratio"], "batched_vs_sequential": batch["ratio"]}
    results["load_avg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    for name, r in (("cache", single), ("no_cache", single), ("batched", batch), ("sequential", batch)):
        print(f"{name:>22}: {r[name]['tokens_per_s']:8.0f} tokens/s")
    print(f"{'same tokens':>22}: cache/no_cache {single['same_tokens']}, batched/sequential {batch['same_tokens']}")
    for k, v in results["ratios"].items():
        print(f"{k:>22}: {v:.2f}x")
    print(f"target: cache_vs_no_cache >= {TARGET_CACHE_VS_NO_CACHE}   "
          f"(load average at end {results['load_avg_at_end']})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
