"""llama2.c checkpoints as transformers models, checked against an independent reference.

The reference (``../shared/tools/llama2c_reference.py``, NumPy, float64 activations)
reproduces llama2.c's ``run.c`` greedy output for aidreams260K; the shipped checkpoint
and texts are real data, never written by this project.
"""

from __future__ import annotations

import importlib.util
import random
import struct
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[3]
DATA = REPO / ".." / "shared" / "data"
REFERENCE = REPO / ".." / "shared" / "tools" / "llama2c_reference.py"
MODEL_DIR = DATA / "aidreams260K"

if not (MODEL_DIR / "aidreams260K.bin").is_file():
    pytest.skip("../shared/data/aidreams260K is absent", allow_module_level=True)
if not REFERENCE.is_file():
    pytest.skip("../shared/tools/llama2c_reference.py is absent", allow_module_level=True)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from workers.models import check_model_id, load_model  # noqa: E402
from workers.models.llama2c import (  # noqa: E402
    Llama2cTokenizer,
    convert_llama2c,
    find_llama2c_files,
    load_llama2c,
    save_as_transformers,
)

LOGIT_TOLERANCE = 1e-4


def _import_reference() -> ModuleType:
    spec = importlib.util.spec_from_file_location("llama2c_reference", REFERENCE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _import_reference()


@pytest.fixture(scope="module")
def loaded():
    return load_llama2c(str(MODEL_DIR))


@pytest.fixture(scope="module")
def reference_model() -> dict:
    return ref.load_model(str(MODEL_DIR / "aidreams260K.bin"))


@pytest.fixture(scope="module")
def reference_vocab(reference_model) -> tuple[list[bytes], list[float]]:
    vocab, scores, _ = ref.load_tok(str(MODEL_DIR / "tok512.bin"), reference_model["vs"])
    return vocab, scores


@pytest.fixture(scope="module")
def wikitext_lines() -> list[str]:
    path = DATA / "wikitext2" / "test.txt"
    if not path.is_file():
        pytest.skip("../shared/data/wikitext2 is absent")
    return path.read_text(encoding="utf-8").split("\n")


@pytest.fixture(scope="module")
def texts(wikitext_lines) -> list[str]:
    shakespeare = DATA / "tinyshakespeare" / "input.txt"
    if not shakespeare.is_file():
        pytest.skip("../shared/data/tinyshakespeare is absent")
    samples = [
        wikitext_lines[1],  # " = Robert <unk> = "
        wikitext_lines[3][:400],  # prose with <unk>, @-@ and punctuation
        wikitext_lines[11][:300],
        shakespeare.read_text(encoding="utf-8")[:400],  # newlines and capitals
        "Robert <unk> is a guest @-@ starring actor",
        " starts with a space",
        "In the dream, a robot hums softly",
        "naïve café — 日本 ✓",  # characters outside the 512-token vocabulary
    ]
    assert any("<unk>" in text for text in samples)
    return samples


def _reference_ids(reference_vocab, text: str) -> list[int]:
    vocab, scores = reference_vocab
    return ref.encode(vocab, scores, text)


def _logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def test_logits_match_reference(loaded, reference_model, reference_vocab, texts):
    worst = 0.0
    for text in texts:
        ids = _reference_ids(reference_vocab, text)[: reference_model["sl"]]
        expected = ref.forward_seq(reference_model, ids)
        actual = _logits(loaded.model, ids)
        assert actual.shape == expected.shape
        difference = float(np.abs(actual - expected).max())
        assert difference < LOGIT_TOLERANCE, (text[:40], difference)
        worst = max(worst, difference)
    # The logits are far from zero, so a tiny difference is a real agreement.
    assert np.abs(expected).max() > 1.0
    print(f"max |Δlogits| vs reference: {worst:.3g}")


def test_model_is_float32_eval_llama(loaded):
    model = loaded.model
    assert not model.training
    assert model.dtype == torch.float32
    assert loaded.family.name == "llama"
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert loaded.info["parameters"] == 230_976  # as published for aidreams260K


def test_tokenizer_matches_reference_on_texts(loaded, reference_vocab, texts):
    for text in texts:
        expected = _reference_ids(reference_vocab, text)
        assert expected[0] == 1  # the reference prepends BOS, the project's encode does not
        assert loaded.tokenizer.encode(text) == expected[1:], text[:40]


def test_tokenizer_matches_reference_on_wikitext_lines(loaded, reference_vocab, wikitext_lines):
    lines = wikitext_lines[:200]
    assert sum(len(line) for line in lines) > 50_000
    for line in lines:
        assert loaded.tokenizer.encode(line) == _reference_ids(reference_vocab, line)[1:], line


def test_tokenizer_matches_reference_on_random_strings(loaded, reference_vocab):
    # Short random strings over an alphabet rich in mergeable pairs, spaces and bytes
    # exercise the tie-breaking of the heap merge against run.c's rescanning loop.
    rng = random.Random(0)
    alphabet = list("  aeinorst.,'\n<>@-") + ["unk", "the", "é", "日", "  "]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert loaded.tokenizer.encode(text) == _reference_ids(reference_vocab, text)[1:], text


def _write_tokenizer(path: Path, pieces: list[tuple[str, float]]) -> None:
    entries = [("<unk>", 0.0), ("\n<s>\n", 0.0), ("\n</s>\n", 0.0)]
    entries += [(f"<0x{byte:02X}>", 0.0) for byte in range(256)] + pieces
    encoded = [(text.encode("utf-8"), score) for text, score in entries]
    blob = struct.pack("<i", max(len(text) for text, _ in encoded))
    for text, score in encoded:
        blob += struct.pack("<fi", score, len(text)) + text
    path.write_bytes(blob)


def test_tokenizer_merge_order_matches_reference_on_tied_scores(tmp_path):
    # The shipped vocabulary has unique scores and no piece like "aa", so the order in
    # which equal-score merges happen never shows there. This one makes it matter:
    # "aaa" is " aa"+"a" (leftmost first, as run.c) but " a"+"aa" if merged rightmost;
    # "ab" and "ba" tie; "bb" scores below run.c's -1e10 floor and never merges.
    path = tmp_path / "tok_ties.bin"
    _write_tokenizer(path, [(" ", -9.0), ("a", -9.0), ("b", -9.0), ("aa", -1.0),
                            ("ab", -2.0), ("ba", -2.0), (" a", -3.0), ("aab", -1.5),
                            ("bb", -2e10)])
    tokenizer = Llama2cTokenizer(path)
    vocab, scores, _ = ref.load_tok(str(path), tokenizer.vocab_size)
    assert tokenizer.encode("aaa") == ref.encode(vocab, scores, "aaa")[1:]
    assert [vocab[i] for i in tokenizer.encode("aaa")] == [b" ", b"aa", b"a"]
    assert [vocab[i] for i in tokenizer.encode("bb")] == [b" ", b"b", b"b"]
    rng = random.Random(1)
    for _ in range(500):
        text = "".join(rng.choice("ab ") for _ in range(rng.randint(0, 24)))
        assert tokenizer.encode(text) == ref.encode(vocab, scores, text)[1:], text


def test_tokenizer_details(loaded):
    tokenizer = loaded.tokenizer
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (1, 2, 512)
    assert tokenizer.encode("") == []
    space = tokenizer.encode(" ")
    assert tokenizer.pieces[space[0]].startswith(b" ")  # dummy prefix even before a space
    unk = tokenizer.encode("<unk>")
    assert 0 not in unk and len(unk) > 2  # literal text, not the unknown-token id
    for text in ["hello world", " leading", "<unk> @-@ 1 @,@ 000", "naïve 日本\n\nx", ""]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode([1] + tokenizer.encode("a dream") + [2]) == "a dream"


def test_tokenizer_encodes_whole_wikitext_file(wikitext_lines):
    # The quadratic run.c loop would take hours here; this guards the heap merge.
    tokenizer = Llama2cTokenizer(MODEL_DIR / "tok512.bin")
    text = "\n".join(wikitext_lines)
    ids = tokenizer.encode(text)
    assert 0 not in ids
    assert len(text) / 2.5 < len(ids) < len(text)
    assert tokenizer.decode(ids) == text


def test_greedy_generation_matches_reference(loaded, reference_model):
    steps = 40
    expected = [1]
    for _ in range(steps):
        token = int(ref.forward_seq(reference_model, expected)[-1].argmax())
        if token == 1:  # run.c stops when the model starts a new document
            break
        expected.append(token)
    assert len(expected) > 10
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=steps, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    generated = loaded.model.generate(torch.tensor([[1]]), generation_config=config)
    assert generated[0].tolist()[: len(expected)] == expected
    assert loaded.tokenizer.decode(expected).strip()


def test_save_as_transformers_reloads_identically(loaded, tmp_path):
    from transformers import LlamaForCausalLM

    out = save_as_transformers(str(MODEL_DIR / "aidreams260K.bin"), tmp_path / "hf")
    assert (out / "config.json").is_file()
    assert (out / "model.safetensors").is_file()
    assert (out / "tok512.bin").is_file()
    reloaded = LlamaForCausalLM.from_pretrained(out)
    reloaded.eval()
    ids = [1] + loaded.tokenizer.encode("A robot dreams of electric sheep, @-@ and <unk>.")
    assert np.array_equal(_logits(reloaded, ids), _logits(loaded.model, ids))
    tokenizer = Llama2cTokenizer(out / "tok512.bin")
    assert tokenizer.encode("electric sheep") == loaded.tokenizer.encode("electric sheep")


def test_load_model_dispatches_llama2c_spec_ids(monkeypatch):
    model_id = "llama2c:" + str(MODEL_DIR)
    assert check_model_id(model_id).ok
    loaded = load_model(model_id, dtype="bfloat16")
    assert loaded.source == model_id
    assert loaded.model.dtype == torch.bfloat16
    # The documented relative form, from the project root.
    monkeypatch.chdir(REPO)
    assert check_model_id("llama2c:../shared/data/aidreams260K").ok


def _write_llama2c(path: Path, *, dim: int, hidden: int, layers: int, heads: int,
                   kv_heads: int, vocab: int, seq_len: int, tied: bool) -> None:
    rng = np.random.default_rng(0)
    head_size = dim // heads
    kv_dim = kv_heads * head_size
    count = (vocab * dim + layers * (2 * dim + 2 * dim * dim + 2 * kv_dim * dim
                                    + 3 * hidden * dim) + dim + seq_len * head_size
             + (0 if tied else vocab * dim))
    weights = rng.normal(0.0, 0.3, count).astype("<f4")
    header = struct.pack("<7i", dim, hidden, layers, heads, kv_heads,
                         vocab if tied else -vocab, seq_len)
    path.write_bytes(header + weights.tobytes())


def test_untied_grouped_query_checkpoint_matches_reference(tmp_path):
    # aidreams260K is tied and has as many KV heads as heads; this covers the other
    # branches of the format (negative vocab size = own classifier, n_kv_heads < n_heads).
    model_bin = tmp_path / "gqa.bin"
    _write_llama2c(model_bin, dim=32, hidden=48, layers=2, heads=4, kv_heads=2, vocab=40,
                   seq_len=16, tied=False)
    config, state = convert_llama2c(model_bin)
    assert not config.tie_word_embeddings
    assert config.num_key_value_heads == 2
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True)
    model.eval()
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    ids = [1, 5, 9, 3, 39, 0, 7, 7, 2, 11, 30, 12]
    expected = ref.forward_seq(ref.load_model(str(model_bin)), ids)
    assert float(np.abs(_logits(model, ids) - expected).max()) < LOGIT_TOLERANCE


def test_bad_checkpoints_are_refused(tmp_path):
    versioned = tmp_path / "v1.bin"
    versioned.write_bytes(struct.pack("<Ii", 0x616B3432, 1) + bytes(256))
    with pytest.raises(ValueError, match="version-1"):
        convert_llama2c(versioned)
    truncated = tmp_path / "short.bin"
    truncated.write_bytes((MODEL_DIR / "aidreams260K.bin").read_bytes()[:-4])
    with pytest.raises(ValueError, match="truncated"):
        convert_llama2c(truncated)


def test_find_files_accepts_directory_or_model_bin():
    by_dir = find_llama2c_files(str(MODEL_DIR))
    by_file = find_llama2c_files(str(MODEL_DIR / "aidreams260K.bin"))
    assert by_dir == by_file
    assert [p.name for p in by_dir] == ["aidreams260K.bin", "tok512.bin"]


def test_find_files_errors_are_clear(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="does not exist") as error:
        find_llama2c_files(str(missing))
    assert "\n" not in str(error.value) and str(missing) in str(error.value)

    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "model.bin").write_bytes(b"")
    for path in (lonely, lonely / "model.bin"):
        with pytest.raises(FileNotFoundError, match=r"tok\*\.bin.*found none") as error:
            find_llama2c_files(str(path))
        assert "\n" not in str(error.value)

    only_tokenizer = tmp_path / "only_tokenizer"
    only_tokenizer.mkdir()
    (only_tokenizer / "tok512.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"one model \.bin.*found none"):
        find_llama2c_files(str(only_tokenizer))

    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.bin", "b.bin", "tok512.bin"):
        (two / name).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="found a.bin, b.bin"):
        find_llama2c_files(str(two))

    check = check_model_id(f"llama2c:{missing}")
    assert not check.ok and "does not exist" in check.message
