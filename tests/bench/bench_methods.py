"""Benchmark: are the structurally smaller variants faster than their base, on CPU?

For ``builtin:tiny-llama`` (or ``--model``), each structural method is applied at
``--rate`` (default 0.5) to a copy of the base model: ``drop_layers``, ``prune_heads``,
``prune_ffn``, ``reduce_hidden``; ``quantize`` (int8) and ``cast`` (bfloat16) are measured
too, for reference. Then the ``speed`` evaluator's fixed-shape protocol runs on the base
and on every variant, in ``--rounds`` interleaved rounds (base, v1, v2, …, base, v1, …) so
that load changes hit all alike; reported per variant: the median over rounds of its
prefill tokens/s and decode ms/token, and the ratio to the base measured in the same
rounds. Two shapes: ``decode`` (batch 1, the evaluator's default protocol, where a small
model's time is mostly per-layer overhead) and ``prefill`` (batch 8 × 256 tokens, where
it is mostly arithmetic).

Target (issue): the structural variants (fewer parameters) are faster than the base:
decode ms/token ratio < 1 and prefill tokens/s ratio > 1. Reported as MEETS/MISSES; a slow
machine does not fail the run. Run from the project root::

    .venv/bin/python tests/bench/bench_methods.py [--rate 0.5] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

STRUCTURAL = ("drop_layers", "prune_heads", "prune_ffn", "reduce_hidden")
REFERENCE = ("quantize", "cast")
PARAMS = {"cast": {"dtype": "bfloat16"}, "quantize": {"scheme": "int8_dynamic"}}
SHAPES = {
    "decode": {"warmup": 1, "repeats": 3, "prompt_length": 64, "new_tokens": 32,
               "batch_size": 1, "prompts": 0},
    "prefill": {"warmup": 1, "repeats": 3, "prompt_length": 256, "new_tokens": 1,
                "batch_size": 8, "prompts": 0},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny-llama")
    parser.add_argument("--rate", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def build_variants(loaded, rate: float) -> dict[str, object]:
    from workers.data import load_documents
    from workers.methods import MethodContext, get_method

    context = MethodContext(
        tokenizer=loaded.tokenizer, family=loaded.family, seed=0, device="cpu",
        calibration_documents=lambda name, split, seed: load_documents(name, split, None, seed))
    variants: dict[str, object] = {"base": loaded.model}
    for name in STRUCTURAL + REFERENCE:
        method = get_method(name)
        config = method.config.model_validate(PARAMS.get(name, {}))
        started = time.perf_counter()
        outcome = method.apply(copy.deepcopy(loaded.model),
                               rate if method.uses_rate else None, config, context)
        outcome.model.eval()
        variants[name] = outcome.model
        print(f"  built {name}: {sum(p.numel() for p in outcome.model.parameters()):,} float "
              f"parameters ({time.perf_counter() - started:.1f} s)", flush=True)
    return variants


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from workers.data import Dataset, load_documents
    from workers.evaluators import evaluators
    from workers.models import load_model

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"bench_methods: {args.model}, rate {args.rate}, {args.rounds} interleaved rounds, "
          f"{args.threads} thread(s); load average {load:.1f} on {os.cpu_count()} CPUs",
          flush=True)
    loaded = load_model(args.model)
    base_params = sum(p.numel() for p in loaded.model.parameters())
    print(f"base: {base_params:,} parameters", flush=True)
    variants = build_variants(loaded, args.rate)
    data = Dataset.of_texts(load_documents("builtin:pydoc", "test"))
    speed = evaluators()["speed"].evaluate
    started = time.perf_counter()
    rows = []
    for shape, settings in SHAPES.items():
        figures: dict[str, dict[str, list[float]]] = {
            name: {"prefill": [], "decode": []} for name in variants}
        for _ in range(args.rounds):
            for name, model in variants.items():
                result = speed(model, loaded.tokenizer, data, {"speed": settings})
                figures[name]["prefill"].append(result["prefill_tokens_per_s"])
                figures[name]["decode"].append(result["decode_ms_per_token"])
        base = {k: statistics.median(v) for k, v in figures["base"].items()}
        print(f"\n== {shape} (batch {settings['batch_size']} × {settings['prompt_length']} "
              "tokens)")
        for name in variants:
            if name == "base":
                print(f"base: prefill {base['prefill']:,.0f} tokens/s, decode "
                      f"{base['decode']:.3f} ms/token")
                continue
            prefill = [v / b for v, b in zip(figures[name]["prefill"], figures["base"]["prefill"],
                                              strict=True)]
            decode = [v / b for v, b in zip(figures[name]["decode"], figures["base"]["decode"],
                                             strict=True)]
            metric_ratio = (statistics.median(decode) if shape == "decode"
                            else statistics.median(prefill))
            faster = metric_ratio < 1 if shape == "decode" else metric_ratio > 1
            what = "decode ms/token" if shape == "decode" else "prefill tokens/s"
            verdict = ("MEETS" if faster else "MISSES") if name in STRUCTURAL else "(reference)"
            print(f"{name:14s} prefill ×{statistics.median(prefill):.2f}, decode ms ×"
                  f"{statistics.median(decode):.2f}  [{what} ratio {metric_ratio:.2f}] {verdict}")
            rows.append((shape, name, f"{metric_ratio:.2f}", verdict))
    print(f"\nsummary ({time.perf_counter() - started:.0f} s of measurement, load average "
          f"{os.getloadavg()[0]:.1f})")
    print(f"{'shape':8s} {'variant':14s} {'ratio to base':14s} verdict")
    for shape, name, ratio, verdict in rows:
        print(f"{shape:8s} {name:14s} {ratio:14s} {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
