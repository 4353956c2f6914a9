"""Benchmark of perplexity evaluation: tokens/s of this tool vs a plain transformers loop.

Measured in one run, on the same model, the same documents and the same thread count:

1. *Plain*: what a researcher writes following the transformers perplexity guide
   ("Perplexity of fixed-length models"), written here independently of the project's
   evaluator but computing the same definition (``workers/evaluators/perplexity.py``):
   the documents are tokenized one by one, each preceded by BOS, into one stream; windows
   of ``--max-length`` tokens start every ``--stride`` tokens; one window at a time
   (batch 1), ``labels`` are the window's ids with -100 over the context (every position
   before the window's ``trg_len`` new tokens), ``model(input_ids, labels=labels).loss``
   times the number of tokens that loss averages over is summed, and the perplexity is
   exp of the mean at the end. The loss shifts labels left by one inside the model, so a
   window's position 0 is never scored: the scored tokens are the -100-free labels at
   positions >= 1, counted exactly (the guide subtracts one per window, which is right
   for the first window only: in the others position 0 is context and already -100).
   Every token after the first is then scored exactly once, as the project's definition
   says; the benchmark checks it: the plain loop's scored-token count must equal the
   evaluator's ``eval_tokens`` and the stream length minus one.
2. *Ours*: the registered ``perplexity`` evaluator (``workers.evaluators.perplexity.
   evaluate``) with ``--batch-size`` windows per forward pass, on the same documents.

Both timings run from documents to perplexity (tokenization included: the evaluator
tokenizes inside ``evaluate``; it is ~1 M tokens/s with the llama2.c tokenizer, small
next to the forward passes). ``--repeats`` runs of each alternate (plain, ours, plain,
ours, ...) after one untimed warm-up of each, so a change of load on the shared machine
hits both alike; the median of each is reported. Figures: tokens scored, seconds and
tokens/s of each, the ratio ours/plain (target >= 1.0x, reported as MEETS/MISSES; a slow
machine does not fail the run), and the two perplexities with their relative
difference, which must be <= 1e-4 (SAME): a fast wrong number is worthless, so DIFFERS
(or unequal scored-token counts) exits with status 1.

Model and text: by default the real llama2.c model aidreams260K (context 128) on the
WikiText-2 test split read as articles (format ``wikitext``) when ``../shared/data``
exists, else ``builtin:tiny-llama`` (trained once into the cache on first use) on the
``builtin:pydoc`` test split. ``--tokens`` keeps the leading documents up to that many
stream tokens (the last document cut at a whitespace), so the run takes about a minute
here. ``torch.set_num_threads(--threads)`` is fixed for the whole run (default 1: on a
shared 2-core machine a second thread mostly measures the neighbours' load, which the
load average printed at the start and end shows).

Run from the project root::

    .venv/bin/python tests/bench/bench_eval.py [--model ID] [--dataset NAME] [--format F]
        [--split S] [--max-length N] [--stride N] [--batch-size 8] [--tokens 200000]
        [--repeats 3] [--threads 1] [--device cpu]

The file name does not match pytest's ``test_*.py``, so the test suite never collects it.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHARED_DATA = Path("../shared/data")
AIDREAMS = "llama2c:../shared/data/aidreams260K"
WIKITEXT_TEST = "../shared/data/wikitext2/test.txt"
FALLBACK_MODEL = "builtin:tiny-llama"
FALLBACK_DATASET = "builtin:pydoc"

RATIO_TARGET = 1.0
SAME_RTOL = 1e-4


# --------------------------------------------------------------------------- plain loop


def plain_perplexity(model: Any, tokenizer: Any, documents: list[str], max_length: int,
                     stride: int, device: str) -> tuple[float, int, int]:
    """(perplexity, scored tokens, stream length): the transformers guide's loop, batch 1."""
    import torch

    ids: list[int] = []
    for doc in documents:
        if tokenizer.bos_id is not None:
            ids.append(tokenizer.bos_id)
        ids.extend(tokenizer.encode(doc))
    encodings = torch.tensor([ids], dtype=torch.long)
    seq_len = encodings.size(1)

    nll_sum = 0.0
    n_scored = 0
    prev_end_loc = 0
    with torch.no_grad():
        for begin_loc in range(0, seq_len, stride):
            end_loc = min(begin_loc + max_length, seq_len)
            trg_len = end_loc - prev_end_loc  # may differ from stride on the last window
            input_ids = encodings[:, begin_loc:end_loc].to(device)
            labels = input_ids.clone()
            labels[:, :-trg_len] = -100  # context only; nothing masked when trg_len is all
            loss = model(input_ids, labels=labels).loss
            # The model shifts labels by one: the loss is the mean over labels[:, 1:].
            scored = int((labels[:, 1:] != -100).sum())
            nll_sum += float(loss) * scored
            n_scored += scored
            prev_end_loc = end_loc
            if end_loc == seq_len:
                break
    return math.exp(nll_sum / n_scored), n_scored, seq_len


# --------------------------------------------------------------------------- ours


def ours_perplexity(model: Any, tokenizer: Any, documents: list[str], max_length: int,
                    stride: int, batch_size: int, device: str) -> tuple[float, int]:
    """(perplexity, scored tokens) from the registered perplexity evaluator."""
    from workers.data import Dataset
    from workers.evaluators import evaluators

    evaluate = evaluators()["perplexity"].evaluate
    result = evaluate(model, tokenizer, Dataset.of_texts(documents, name="bench"),
                      {"max_length": max_length, "stride": stride, "batch_size": batch_size},
                      device=device)
    return result["perplexity"], int(result["eval_tokens"])


# --------------------------------------------------------------------------- text


def leading_documents(tokenizer: Any, documents: list[str],
                      n_tokens: int) -> tuple[list[str], int]:
    """(documents, stream length): the leading documents whose stream (BOS + ids of each)
    holds at most ``n_tokens`` tokens; the one that would overflow is cut at the last
    whitespace that fits."""
    bos = 0 if tokenizer.bos_id is None else 1
    kept: list[str] = []
    used = 0
    for doc in documents:
        room = n_tokens - used - bos
        if room < 1:
            break
        count = len(tokenizer.encode(doc))
        if count <= room:
            kept.append(doc)
            used += bos + count
            continue
        cuts = [m.start() for m in re.finditer(r"\s", doc)]
        lo, hi, best, best_count = 0, len(cuts) - 1, 0, 0
        while lo <= hi:  # largest cut whose prefix fits (token counts grow with the prefix)
            mid = (lo + hi) // 2
            count = len(tokenizer.encode(doc[:cuts[mid]]))
            if count <= room:
                best, best_count, lo = cuts[mid], count, mid + 1
            else:
                hi = mid - 1
        if best:
            kept.append(doc[:best])
            used += bos + best_count
        break
    return kept, used


# --------------------------------------------------------------------------- timing


@dataclass
class Runs:
    """Timed runs of one implementation; every run must give the same value."""

    label: str
    times: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    scored: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def per_s(self) -> float:
        return self.scored / self.median


def timed(runs: Runs, fn: Callable[[], tuple[float, int]]) -> None:
    started = time.perf_counter()
    value, scored = fn()
    runs.times.append(time.perf_counter() - started)
    runs.values.append(value)
    runs.scored = scored


def verdict(ok: bool) -> str:
    return "MEETS" if ok else "MISSES"


def load_avg() -> str:
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shared = SHARED_DATA.is_dir()
    parser.add_argument("--model", default=AIDREAMS if shared else FALLBACK_MODEL,
                        help=f"model id (default: {AIDREAMS} when {SHARED_DATA} exists, "
                             f"else {FALLBACK_MODEL})")
    parser.add_argument("--dataset", default=WIKITEXT_TEST if shared else FALLBACK_DATASET,
                        help=f"text dataset name (default: {WIKITEXT_TEST} when {SHARED_DATA} "
                             f"exists, else {FALLBACK_DATASET})")
    parser.add_argument("--format", default=None,
                        help="dataset format (default: wikitext for the WikiText-2 file, "
                             "else inferred from the name)")
    parser.add_argument("--split", default="test", help="dataset split (default test)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="window length (default: the model's context, 128 for "
                             "aidreams260K)")
    parser.add_argument("--stride", type=int, default=None,
                        help="tokens between window starts (default max_length // 2)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="windows per forward pass of ours (default 8; plain is batch 1)")
    parser.add_argument("--tokens", type=int, default=200_000,
                        help="stream tokens evaluated: the leading documents up to this many "
                             "(default 200,000)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of each, alternating; the median is reported")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads for the whole run (default 1)")
    parser.add_argument("--device", default="cpu", help="device of the model (default cpu)")
    args = parser.parse_args(argv)
    if args.format is None and args.dataset == WIKITEXT_TEST:
        args.format = "wikitext"
    if args.tokens < 2 or args.repeats < 1 or args.batch_size < 1 or args.threads < 1:
        parser.error("need --tokens >= 2, --repeats >= 1, --batch-size >= 1, --threads >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from workers.data import load_dataset
    from workers.models import load_model

    torch.set_num_threads(args.threads)
    print(f"bench_eval: {args.model} on {args.dataset} ({args.format or 'inferred format'}, "
          f"split {args.split}), {args.repeats} alternating runs of each; "
          f"torch {torch.__version__} with {torch.get_num_threads()} thread(s) on "
          f"{args.device}; {load_avg()}", flush=True)

    started = time.perf_counter()
    if args.model.startswith("builtin:"):
        from workers.models.builtin import ensure_builtin_model

        ensure_builtin_model(args.model.removeprefix("builtin:"))
    loaded = load_model(args.model, device=args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    model.eval()
    context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    max_length = args.max_length or context
    if max_length < 2:
        print(f"--max-length is needed: the model's context is unknown ({context})")
        return 2
    stride = args.stride or max(1, max_length // 2)
    if not 1 <= stride < max_length:
        print(f"--stride must be in [1, max_length={max_length}), got {stride}")
        return 2
    entry = {"name": args.dataset, "split": args.split, "format": args.format}
    documents, stream = leading_documents(tokenizer, load_dataset(entry).documents(),
                                          args.tokens)
    if stream < 2:
        print(f"the text has {stream} tokens; nothing to score")
        return 2
    whole = " (the whole dataset)" if stream < args.tokens * 0.99 else ""
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {type(model).__name__}, {n_params:,} parameters, {model.dtype}, attention "
          f"{model.config._attn_implementation}, context {context}; windows: max_length "
          f"{max_length}, stride {stride}; ours batch size {args.batch_size}; text: "
          f"{len(documents)} documents, {stream:,} tokens (--tokens {args.tokens:,}){whole} "
          f"(setup {time.perf_counter() - started:.1f} s)", flush=True)

    def plain() -> tuple[float, int]:
        value, scored, stream = plain_perplexity(model, tokenizer, documents, max_length,
                                                 stride, args.device)
        if scored != stream - 1:
            raise AssertionError(f"plain loop scored {scored} tokens of a {stream}-token "
                                 f"stream; every token after the first must be scored once")
        return value, scored

    def ours() -> tuple[float, int]:
        return ours_perplexity(model, tokenizer, documents, max_length, stride,
                               args.batch_size, args.device)

    warm, _ = leading_documents(tokenizer, documents, 4 * max_length)
    plain_perplexity(model, tokenizer, warm, max_length, stride, args.device)
    ours_perplexity(model, tokenizer, warm, max_length, stride, args.batch_size, args.device)

    plain_runs = Runs("plain transformers loop (batch 1)")
    ours_runs = Runs(f"ours: perplexity evaluator (batch {args.batch_size})")
    for index in range(args.repeats):
        for runs, fn in ((plain_runs, plain), (ours_runs, ours)):
            timed(runs, fn)
            print(f"  run {index + 1}: {runs.label}: {runs.times[-1]:.2f} s, "
                  f"{runs.scored / runs.times[-1]:,.0f} tokens/s, perplexity "
                  f"{runs.values[-1]:.6f}", flush=True)

    problems = []
    if plain_runs.scored != ours_runs.scored:
        problems.append(f"scored-token counts differ: plain {plain_runs.scored}, "
                        f"ours {ours_runs.scored}")
    for runs in (plain_runs, ours_runs):
        if max(runs.values) - min(runs.values) > SAME_RTOL * abs(runs.values[0]):
            problems.append(f"{runs.label} gave different values across runs: {runs.values}")

    print(f"\ntokens scored: plain {plain_runs.scored:,}, ours {ours_runs.scored:,}")
    for runs in (plain_runs, ours_runs):
        spread = ", ".join(f"{t:.2f}" for t in runs.times)
        print(f"{runs.label}: median {runs.median:.2f} s [{spread}] = {runs.per_s:,.0f} "
              f"tokens/s")
    ratio = ours_runs.per_s / plain_runs.per_s
    fast = ratio >= RATIO_TARGET
    print(f"ours / plain: {ratio:.2f}x (target >= {RATIO_TARGET:.1f}x) {verdict(fast)}")
    ppl_plain, ppl_ours = plain_runs.values[-1], ours_runs.values[-1]
    rel = abs(ppl_ours - ppl_plain) / abs(ppl_plain)
    same = rel <= SAME_RTOL and not problems
    print(f"perplexity: plain {ppl_plain:.6f}, ours {ppl_ours:.6f}, relative difference "
          f"{rel:.2e} (must be <= {SAME_RTOL:g}) {'SAME' if same else 'DIFFERS'}")
    for problem in problems:
        print(f"  {problem}")

    table = [
        ("what", "figure", "target", "verdict"),
        (plain_runs.label, f"{plain_runs.per_s:,.0f} tokens/s ({plain_runs.median:.2f} s)",
         "", ""),
        (ours_runs.label, f"{ours_runs.per_s:,.0f} tokens/s ({ours_runs.median:.2f} s)", "", ""),
        ("ours / plain", f"{ratio:.2f}x", f">= {RATIO_TARGET:.1f}x", verdict(fast)),
        ("perplexity ours vs plain", f"{ppl_ours:.4f} vs {ppl_plain:.4f}, rel {rel:.1e}",
         f"<= {SAME_RTOL:g} rel", "SAME" if same else "DIFFERS"),
    ]
    print(f"\nsummary ({plain_runs.scored:,} tokens scored, total "
          f"{time.perf_counter() - started:.0f} s, {load_avg()})")
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
