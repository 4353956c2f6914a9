"""The built-in model ``builtin:tiny-llama``: a small Llama trained here, on first use.

Sweeps need a real, pretrained, Llama-architecture model with grouped-query attention
that runs on a laptop CPU and needs no download. Nothing published fits, so this
module trains one from scratch in about a minute and a half on two CPU cores:

- corpus: the ``train`` split of ``builtin:pydoc`` (:mod:`workers.data.builtin`), so
  the ``validation`` and ``test`` splits are text the model never saw;
- tokenizer: byte-level BPE trained with ``tokenizers`` on the same split, wrapped as a
  ``PreTrainedTokenizerFast`` (adds ``<s>`` like Llama tokenizers do);
- model: ``LlamaForCausalLM`` with the dimensions of :data:`TINY_LLAMA_RECIPE`, trained
  with AdamW and a warm-up + cosine schedule on a packed token stream (``<s>``
  between documents), with fixed seeds and a fixed data order.

The checkpoint is a standard transformers directory (``config.json``,
``model.safetensors``, tokenizer files, ``recipe.json``) under
``cache_dir()/models/tiny-llama-<RECIPE_VERSION>-<corpus fingerprint>``. The corpus
fingerprint is part of the name because the pydoc text changes between Python
releases, and a model trained on another release's ``train`` split may have seen this
release's ``test`` split.

Training happens once per cache directory: concurrent callers (Ray workers) serialise
on an ``fcntl.flock`` lock file, the winner trains into a temporary directory and
renames it into place, the others wait and reuse it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from workers.cache import cache_dir, stable_hash

BUILTIN_MODEL_NAMES = ("tiny-llama",)

# Bump when the training code changes the resulting weights without changing a
# recipe field, so old checkpoints land in a different cache directory.
RECIPE_REVISION = 1

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"


@dataclass(frozen=True)
class TinyLlamaRecipe:
    """Everything that determines the weights of ``builtin:tiny-llama``."""

    # Architecture: 8 query heads sharing 2 key/value heads (GQA), 8 layers so that
    # layer-dropping sweeps have fractions to drop. Width 96 rather than 128: with a
    # fixed ~90 s budget the narrower model takes more steps and ends better (test
    # perplexity 62 vs 67 on the pydoc test split).
    vocab_size: int = 1024
    hidden_size: int = 96
    intermediate_size: int = 256
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    # Optimisation. seq_len equals max_position_embeddings so that every position an
    # evaluator may use has been trained.
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 500
    lr: float = 4e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    # Data.
    corpus: str = "builtin:pydoc"
    split: str = "train"
    tokenizer: str = "byte-level BPE (tokenizers), trained on the same split"

    def __post_init__(self) -> None:
        problems = []
        if self.steps < 1 or self.batch_size < 1:
            problems.append("steps and batch_size must be positive")
        if not 2 <= self.seq_len <= self.max_position_embeddings:
            problems.append("seq_len must be within 2..max_position_embeddings")
        if self.hidden_size % self.num_attention_heads:
            problems.append("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if self.vocab_size < 260:
            problems.append("vocab_size must cover the 256 bytes and 4 special tokens")
        if problems:
            raise ValueError("invalid tiny-llama recipe: " + "; ".join(problems))


TINY_LLAMA_RECIPE = TinyLlamaRecipe()


def recipe_version(recipe: TinyLlamaRecipe) -> str:
    """Short version string of a recipe: code revision plus a hash of its fields."""
    return f"r{RECIPE_REVISION}-{stable_hash(asdict(recipe))[:8]}"


RECIPE_VERSION = recipe_version(TINY_LLAMA_RECIPE)


def corpus_fingerprint(recipe: TinyLlamaRecipe = TINY_LLAMA_RECIPE) -> str:
    """sha256 (first 10 hex digits) of the training documents of ``recipe``."""
    documents = _corpus_documents(recipe, recipe.split)
    digest = hashlib.sha256()
    for document in documents:
        digest.update(document.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:10]


def builtin_model_dir(name: str, recipe: TinyLlamaRecipe | None = None) -> Path:
    """Where the checkpoint of built-in model ``name`` lives (whether or not it exists)."""
    _check_name(name)
    recipe = recipe or TINY_LLAMA_RECIPE
    version = recipe_version(recipe)
    return cache_dir() / "models" / f"{name}-{version}-{corpus_fingerprint(recipe)}"


def ensure_builtin_model(name: str, *, progress: bool = True,
                         recipe: TinyLlamaRecipe | None = None) -> Path:
    """The checkpoint directory of built-in model ``name``, training it on first use.

    Only ``"tiny-llama"`` exists; other names raise ``ValueError``. ``recipe``
    replaces :data:`TINY_LLAMA_RECIPE` (tests use a tiny one); every recipe gets its
    own cache directory. ``progress=False`` silences the progress display. Safe to call
    from many processes at once: one trains, the others wait for it and reuse its result.
    """
    recipe = recipe or TINY_LLAMA_RECIPE
    target = builtin_model_dir(name, recipe)
    if _is_complete(target):
        return target
    models_dir = target.parent
    models_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(models_dir / f"{target.name}.lock", name, progress):
        # Another process may have finished training while this one waited.
        if _is_complete(target):
            return target
        # Holding the lock, any temporary directory or partial target is left over
        # from a process that died mid-training.
        for stale in models_dir.glob(f".{target.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=models_dir))
        try:
            _train_in_subprocess(tmp, recipe, progress=progress, announce_dir=target)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _train_in_subprocess(out_dir: Path, recipe: TinyLlamaRecipe, *, progress: bool,
                         announce_dir: Path) -> None:
    """Run :func:`train_tiny_llama` in a fresh Python process and wait for it.

    A child process, because OpenMP reads its spin-wait setting only when torch loads.
    libgomp's default is to busy-wait long at every barrier; measured here, when
    another torch process is busy on the same two cores, a training step then takes
    1.5-10 s instead of 0.19 s, as on any shared machine. A short spin
    (``GOMP_SPINCOUNT=10000``) kept it at ~0.5 s in the same situation and costs ~2 %
    when the machine is idle (``OMP_WAIT_POLICY=PASSIVE``: ~40 %). The child also
    leaves the caller's torch threads, RNG state and memory untouched.
    """
    env = dict(os.environ)
    if "OMP_WAIT_POLICY" not in env:  # a user's explicit choice wins
        env.setdefault("GOMP_SPINCOUNT", "10000")
    env.pop("OMP_NUM_THREADS", None)  # Ray sets 1 for its workers; the child sets its own
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "workers.models.builtin", str(out_dir),
               json.dumps(asdict(recipe)), str(announce_dir), "1" if progress else "0",
               str(os.getpid())]
    completed = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"training builtin:tiny-llama failed (exit code "
                           f"{completed.returncode}); its error is printed above")


def _watch_parent(parent_pid: int) -> None:
    """Exit when the parent dies: it holds the lock, and no one else will rename our work."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(3)

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()


def _child_main(argv: list[str]) -> None:
    out_dir, recipe_json, announce_dir, progress, parent_pid = argv
    _watch_parent(int(parent_pid))
    from transformers.utils import logging as transformers_logging

    # Our own bar (or lines) report the training; transformers' "Writing model shards"
    # bar would only add noise to worker logs. This process exits afterwards.
    transformers_logging.disable_progress_bar()
    recipe = TinyLlamaRecipe(**json.loads(recipe_json))
    train_tiny_llama(Path(out_dir), recipe, progress=progress == "1",
                     announce_dir=Path(announce_dir))


def train_tiny_llama(out_dir: Path, recipe: TinyLlamaRecipe = TINY_LLAMA_RECIPE, *,
                     progress: bool = True, announce_dir: Path | None = None) -> dict[str, Any]:
    """Train tokenizer and model per ``recipe`` and save the checkpoint into ``out_dir``.

    Returns the record also written to ``out_dir/recipe.json``. Prefer
    :func:`ensure_builtin_model`, which caches and locks.
    """
    import tokenizers
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    train_docs = _corpus_documents(recipe, recipe.split)
    tokenizer = train_tokenizer(train_docs, recipe.vocab_size, recipe.max_position_embeddings)
    tokenizer_seconds = time.perf_counter() - started
    stream = torch.tensor(packed_token_stream(tokenizer, train_docs), dtype=torch.long)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": recipe.rope_theta},
        tie_word_embeddings=recipe.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    threads = _available_cpus()
    previous_threads = torch.get_num_threads()
    # Ray limits worker processes to one thread; training is a one-off that should
    # use the whole machine, after which the worker's setting is restored.
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng():  # the caller's RNG state is not ours to reseed
            torch.manual_seed(recipe.seed)
            model = LlamaForCausalLM(config)
            losses = _train(model, stream, recipe, progress, announce_dir or out_dir)
        model.eval()
        validation_ids = packed_token_stream(tokenizer, _corpus_documents(recipe, "validation"))
        validation_ppl = heldout_perplexity(model, validation_ids, recipe.seq_len)
    finally:
        torch.set_num_threads(previous_threads)
    training_seconds = time.perf_counter() - started

    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    tail = losses[-10:]
    record: dict[str, Any] = {
        "name": "tiny-llama",
        "recipe_version": recipe_version(recipe),
        "recipe": asdict(recipe),
        "architecture": "LlamaForCausalLM",
        "parameters": sum(p.numel() for p in model.parameters()),
        "corpus_fingerprint": corpus_fingerprint(recipe),
        "train_documents": len(train_docs),
        "train_tokens": int(stream.numel()),
        "tokens_seen": recipe.steps * recipe.batch_size * recipe.seq_len,
        "final_train_loss": round(sum(tail) / len(tail), 4),  # mean of the last 10 steps
        "validation_perplexity": round(validation_ppl, 3),
        "tokenizer_seconds": round(tokenizer_seconds, 2),
        "training_seconds": round(training_seconds, 2),  # tokenizer + model + validation
        "torch_threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    # Written last: its presence marks a complete checkpoint.
    (out_dir / "recipe.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def train_tokenizer(documents: list[str], vocab_size: int, max_length: int = 256) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``documents``.

    Byte-level, so any text round-trips and ``<unk>`` never occurs; encoding with
    special tokens prepends ``<s>``, as Llama tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, EOS, UNK, PAD]
    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(documents, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, backend.token_to_id(BOS))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        model_max_length=max_length,
    )


def packed_token_stream(tokenizer: Any, documents: list[str]) -> list[int]:
    """Token ids of ``documents`` concatenated, each preceded by BOS (the training layout)."""
    bos = tokenizer.bos_token_id
    stream: list[int] = []
    # The backend tokenizer, because the wrapper warns about every document longer
    # than model_max_length, which is irrelevant for a stream cut into windows later.
    for encoding in tokenizer.backend_tokenizer.encode_batch(documents, add_special_tokens=False):
        stream.append(bos)
        stream.extend(encoding.ids)
    return stream


def heldout_perplexity(model: Any, token_ids: list[int], seq_len: int,
                       batch_size: int = 16) -> float:
    """Token-level perplexity of ``model`` over non-overlapping ``seq_len`` windows.

    Each window's first token is context only; every other token is predicted from
    the window before it. This is the recipe's own yardstick (validation perplexity in
    ``recipe.json``), not a replacement for the perplexity evaluator.
    """
    import torch
    import torch.nn.functional as functional

    def score(ids: Any) -> tuple[float, int]:
        logits = model(input_ids=ids).logits[:, :-1].float()
        targets = ids[:, 1:]
        nll = functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
        )
        return nll.item(), targets.numel()

    ids = torch.tensor(token_ids, dtype=torch.long)
    full = ids.numel() // seq_len
    windows = ids[: full * seq_len].view(full, seq_len)
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        parts = [windows[i:i + batch_size] for i in range(0, full, batch_size)]
        if ids.numel() - full * seq_len > 1:
            parts.append(ids[full * seq_len:].unsqueeze(0))
        for part in parts:
            nll, count = score(part)
            total_nll += nll
            total_tokens += count
    return math.exp(total_nll / total_tokens)


def _train(model: Any, stream: Any, recipe: TinyLlamaRecipe, progress: bool,
           where: Path) -> list[float]:
    import torch

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "norm" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(recipe.adam_beta1, recipe.adam_beta2), eps=1e-8, fused=True,
    )

    def lr_factor(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        progress_ = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))
        return recipe.min_lr_ratio + (1.0 - recipe.min_lr_ratio) * cosine

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    batches = _batches(stream, recipe)
    losses: list[float] = []
    model.train()
    with _progress_display(progress, where, recipe.steps) as advance:
        for _ in range(recipe.steps):
            input_ids = next(batches)
            loss = model(input_ids=input_ids, labels=input_ids).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            advance(losses[-1])
    return losses


def _batches(stream: Any, recipe: TinyLlamaRecipe) -> Iterator[Any]:
    """Endless batches of ``seq_len`` windows, in an order fixed by the recipe's seed.

    Each pass over the stream starts at a new offset so windows do not always cut the
    text at the same places, and visits the windows in a new permutation.
    """
    import torch

    generator = torch.Generator().manual_seed(recipe.seed)
    length = recipe.seq_len
    if stream.numel() < 2 * length:
        raise ValueError(f"training stream of {stream.numel()} tokens is too short")
    pending: list[Any] = []
    while True:
        offset = int(torch.randint(0, length, (1,), generator=generator))
        count = (stream.numel() - offset) // length
        windows = stream[offset:offset + count * length].view(count, length)
        pending.extend(windows[torch.randperm(count, generator=generator)])
        while len(pending) >= recipe.batch_size:
            batch, pending = pending[:recipe.batch_size], pending[recipe.batch_size:]
            yield torch.stack(batch)


@contextlib.contextmanager
def _progress_display(enabled: bool, where: Path, total: int) -> Iterator[Any]:
    """Announce the training on stderr, with a rich progress bar when stderr is a TTY.

    Yields a callback taking each step's loss. Without a TTY (Ray worker logs, CI) a
    line at the start and one at the end replace the bar.
    """
    if not enabled:
        yield lambda loss: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    print(f"training builtin:tiny-llama (first use, cached in {where})", file=sys.stderr,
          flush=True)
    started = time.perf_counter()
    losses: list[float] = []
    if console.is_terminal:
        # The long announcement stays above the bar; the bar itself must fit 80 columns.
        columns = (TextColumn("tiny-llama"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("tiny-llama", total=total, loss=float("nan"))

            def advance(loss: float) -> None:
                losses.append(loss)
                bar.update(task, advance=1, loss=loss)

            yield advance
    else:
        yield losses.append
    loss_text = f", final loss {losses[-1]:.3f}" if losses else ""
    print(f"trained builtin:tiny-llama in {time.perf_counter() - started:.0f} s{loss_text}",
          file=sys.stderr, flush=True)


@contextlib.contextmanager
def _exclusive_lock(path: Path, name: str, progress: bool) -> Iterator[None]:
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"waiting for another process to finish training builtin:{name} …",
                      file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_complete(directory: Path) -> bool:
    return (directory / "recipe.json").is_file()


def _check_name(name: str) -> None:
    if name not in BUILTIN_MODEL_NAMES:
        raise ValueError(f"unknown built-in model {name!r}; built-ins: "
                         + ", ".join(f"builtin:{n}" for n in BUILTIN_MODEL_NAMES))


def _corpus_documents(recipe: TinyLlamaRecipe, split: str) -> list[str]:
    if recipe.corpus != "builtin:pydoc":
        raise ValueError(f"unsupported corpus {recipe.corpus!r}; only builtin:pydoc")
    from workers.data.builtin import pydoc_documents

    return pydoc_documents(split)


def _available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
