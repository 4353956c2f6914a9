"""llama2.c checkpoints (Karpathy's ``run.c`` format) loaded as transformers Llama models.

A spec id ``llama2c:PATH`` names either a directory holding exactly one model ``.bin``
and one tokenizer ``tok*.bin`` (``tok512.bin``, ``tokenizer.bin``), or the model ``.bin``
itself with the tokenizer beside it. Only the legacy export (``export.py --version 0``,
the format ``run.c`` reads) is supported: a 7 × int32 header followed by float32 weights.

The model becomes a stock ``LlamaForCausalLM`` so every method and evaluator treats it
like any other checkpoint, and :func:`save_as_transformers` writes it out as a normal
transformers directory. The tokenizer stays llama2.c's own: :class:`Llama2cTokenizer`
reproduces ``run.c``'s ``encode`` exactly (see the class docstring).
"""

from __future__ import annotations

import heapq
import shutil
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.models import LoadedModel, family_for

if TYPE_CHECKING:
    from transformers import LlamaConfig

BOS_ID = 1
EOS_ID = 2
HEADER = struct.Struct("<7i")
# llama2.c's export.py (version >= 1) starts with this magic ("ak42"); legacy has none.
VERSIONED_MAGIC = 0x616B3432
# run.c starts its best-merge search at this score, so pairs scoring lower never merge.
RUN_C_MIN_SCORE = -1e10

EXPECTED = "a directory with one model .bin and one tok*.bin, or a path to the model .bin"


def find_llama2c_files(path: str) -> tuple[Path, Path]:
    """Resolve ``path`` to ``(model_bin, tokenizer_bin)``.

    ``path`` is a directory containing exactly one model ``.bin`` and one ``tok*.bin``,
    or a model ``.bin`` with exactly one ``tok*.bin`` beside it. Relative paths are
    taken from the current directory. Raises :class:`FileNotFoundError` with a one-line
    message naming what is missing.
    """
    given = Path(path).expanduser()
    where = f"llama2c:{path}"
    if given.is_dir():
        directory = given
        bins = sorted(p for p in directory.glob("*.bin") if p.is_file())
        models = [p for p in bins if not _is_tokenizer_name(p)]
        if len(models) != 1:
            found = ", ".join(p.name for p in models) if models else "none"
            raise FileNotFoundError(
                f"{where}: expected exactly one model .bin in {directory} "
                f"(not named tok*.bin), found {found}"
            )
        model_bin = models[0]
    elif given.is_file():
        if given.suffix != ".bin" or _is_tokenizer_name(given):
            raise FileNotFoundError(f"{where}: {given} is not a llama2.c model .bin; expected "
                                    f"{EXPECTED}")
        model_bin = given
        directory = given.parent
    else:
        raise FileNotFoundError(f"{where}: {given} does not exist; expected {EXPECTED}")

    tokenizers = sorted(p for p in directory.glob("tok*.bin") if p.is_file())
    if len(tokenizers) != 1:
        found = ", ".join(p.name for p in tokenizers) if tokenizers else "none"
        raise FileNotFoundError(
            f"{where}: expected exactly one llama2.c tokenizer tok*.bin (e.g. tok512.bin) "
            f"beside {model_bin.name} in {directory}, found {found}"
        )
    return model_bin, tokenizers[0]


def _is_tokenizer_name(path: Path) -> bool:
    return path.name.startswith("tok")


class Llama2cTokenizer:
    """llama2.c's tokenizer (``tokenizer.bin`` format), encoding exactly as ``run.c``.

    ``encode`` follows ``run.c``: a dummy-prefix ``" "`` token first whenever the text is
    non-empty (also when the text already starts with a space); each character its own
    token if it is in the vocabulary, else its UTF-8 bytes as byte tokens (id = byte + 3);
    then, repeatedly, the adjacent pair whose concatenated string is in the vocabulary
    with the highest score is merged, the leftmost pair winning ties. Characters are
    looked up one at a time, so a literal ``<unk>`` in the text is the five characters
    ``<`` ``u`` ``n`` ``k`` ``>``, never the unknown-token id 0.

    ``run.c`` rescans all pairs after every merge, which is quadratic and far too slow
    for a whole corpus. Here the same merges are found with a heap; see
    :meth:`_merge` for why the result is identical, so there is no chunking: a whole
    file encodes as ``run.c`` would encode it as a single prompt. Callers that want
    ``run.c``'s per-prompt behaviour (one dummy prefix per prompt) encode prompts
    separately.
    """

    def __init__(self, path: str | Path, vocab_size: int | None = None) -> None:
        data = Path(path).read_bytes()
        if len(data) < 4:
            raise ValueError(f"{path} is not a llama2.c tokenizer file (too short)")
        (self.max_token_length,) = struct.unpack_from("<i", data, 0)
        pieces: list[bytes] = []
        scores: list[float] = []
        offset = 4
        # The file does not store the vocabulary size; run.c takes it from the model header.
        while offset < len(data) and (vocab_size is None or len(pieces) < vocab_size):
            if offset + 8 > len(data):
                raise ValueError(f"{path}: truncated tokenizer entry {len(pieces)}")
            score, length = struct.unpack_from("<fi", data, offset)
            offset += 8
            if length < 0 or offset + length > len(data):
                raise ValueError(f"{path}: bad length {length} for tokenizer entry {len(pieces)}")
            pieces.append(data[offset : offset + length])
            scores.append(score)
            offset += length
        if vocab_size is not None and len(pieces) != vocab_size:
            raise ValueError(f"{path} has {len(pieces)} tokens but the model expects {vocab_size}")
        self.pieces = pieces
        self.scores = scores
        self.vocab_size = len(pieces)
        self.bos_id: int | None = BOS_ID
        self.eos_id: int | None = EOS_ID
        # Later duplicates win, as in a dict built over the vocabulary; run.c's bsearch
        # would pick an arbitrary one, so a vocabulary with duplicates is ambiguous anyway.
        self._lookup: dict[bytes, int] = {piece: i for i, piece in enumerate(pieces)}
        self._char_ids: dict[str, tuple[int, ...]] = {}
        # (left id, right id) -> (negated score, merged id), or None when not mergeable.
        self._pair_cache: dict[tuple[int, int], tuple[float, int] | None] = {}
        self._decoded = [_piece_bytes(piece) for piece in pieces]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as ``run.c`` encodes it, without BOS/EOS."""
        if not text:
            return []
        ids = [self._lookup[b" "]]
        char_ids = self._char_ids
        for char in text:
            found = char_ids.get(char)
            if found is None:
                found = self._ids_of_char(char)
                char_ids[char] = found
            ids.extend(found)
        return self._merge(ids)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; inverse of :meth:`encode` (``decode(encode(t)) == t``).

        The space at the start of a sequence (or right after BOS) is the dummy prefix and
        is dropped, as ``run.c`` does after BOS; BOS and EOS contribute no text; byte
        tokens become their bytes, and invalid UTF-8 is replaced.
        """
        out = bytearray()
        at_start = True
        for token in ids:
            token = int(token)
            if token in (self.bos_id, self.eos_id):
                at_start = token == self.bos_id
                continue
            piece = self._decoded[token]
            if at_start and piece.startswith(b" "):
                piece = piece[1:]
            out += piece
            at_start = False
        return out.decode("utf-8", errors="replace")

    def _ids_of_char(self, char: str) -> tuple[int, ...]:
        # surrogatepass: a lone surrogate (e.g. from surrogateescape) still has bytes.
        encoded = char.encode("utf-8", errors="surrogatepass")
        if encoded in self._lookup:
            return (self._lookup[encoded],)
        return tuple(byte + 3 for byte in encoded)

    def _pair(self, left: int, right: int) -> tuple[float, int] | None:
        key = (left, right)
        try:
            return self._pair_cache[key]
        except KeyError:
            pass
        merged = self._lookup.get(self.pieces[left] + self.pieces[right])
        result = None
        if merged is not None and self.scores[merged] > RUN_C_MIN_SCORE:
            result = (-self.scores[merged], merged)
        self._pair_cache[key] = result
        return result

    def _merge(self, ids: list[int]) -> list[int]:
        """Apply run.c's merge loop to ``ids`` in O(n log n).

        run.c merges, at each step, the pair with the highest score and, among equal
        scores, the leftmost (its comparison is a strict ``>`` in a left-to-right scan).
        Tokens live in a linked list over their original positions and a merged token
        keeps its left position, so position order is sequence order at every step. The
        heap is keyed by (-score, left position): its smallest *current* entry is exactly
        run.c's choice. A merge changes only the pairs touching the merged token; their
        old entries are invalidated by a per-position version and new ones pushed, so
        every valid entry describes a pair that exists now with its current score.
        """
        count = len(ids)
        if count < 2:
            return ids
        tokens = list(ids)
        following = list(range(1, count + 1))
        following[-1] = -1
        preceding = list(range(-1, count - 1))
        # version[i] changes whenever the pair starting at position i changes or dies.
        version = [0] * count
        pair = self._pair
        heap: list[tuple[float, int, int, int]] = []
        for position in range(count - 1):
            found = pair(tokens[position], tokens[position + 1])
            if found is not None:
                heap.append((found[0], position, 0, found[1]))
        heapq.heapify(heap)
        push = heapq.heappush
        pop = heapq.heappop
        while heap:
            _, left, stamp, merged = pop(heap)
            if version[left] != stamp:
                continue
            right = following[left]
            tokens[left] = merged
            after = following[right]
            following[left] = after
            if after >= 0:
                preceding[after] = left
            tokens[right] = -1
            version[right] += 1
            version[left] += 1
            found = pair(merged, tokens[after]) if after >= 0 else None
            if found is not None:
                push(heap, (found[0], left, version[left], found[1]))
            before = preceding[left]
            if before >= 0:
                version[before] += 1
                found = pair(tokens[before], merged)
                if found is not None:
                    push(heap, (found[0], before, version[before], found[1]))
        result = []
        position = 0  # the first token is never merged into a left neighbour
        while position >= 0:
            result.append(tokens[position])
            position = following[position]
        return result


def _piece_bytes(piece: bytes) -> bytes:
    # Byte-fallback tokens are stored as the text "<0xAB>"; run.c prints them as the byte.
    if len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            return piece
    return piece


def convert_llama2c(model_bin: str | Path) -> tuple[LlamaConfig, dict[str, Any]]:
    """Read a legacy llama2.c checkpoint as a ``LlamaConfig`` and a transformers state dict.

    The state dict holds float32 tensors keyed as ``LlamaForCausalLM`` expects. The
    query/key rows are permuted per head from llama2.c's interleaved RoPE pairs to the
    rotate-halves layout transformers uses (what llama2.c's own HF export does).
    """
    import numpy as np
    import torch
    from transformers import LlamaConfig

    path = Path(model_bin)
    with path.open("rb") as handle:
        header = handle.read(HEADER.size)
    if len(header) < HEADER.size:
        raise ValueError(f"{path} is too short for a llama2.c header")
    (magic,) = struct.unpack_from("<I", header, 0)
    if magic == VERSIONED_MAGIC:
        (version,) = struct.unpack_from("<i", header, 4)
        raise ValueError(
            f"{path} is a llama2.c version-{version} export; only the legacy format "
            "(export.py --version 0, the one run.c reads) is supported"
        )
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, signed_vocab, seq_len = HEADER.unpack(header)
    # A negative vocabulary size is llama2.c's flag for an untied classifier.
    shared_classifier = signed_vocab > 0
    vocab_size = abs(signed_vocab)
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len) <= 0 or (
        dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2
    ):
        raise ValueError(
            f"{path}: implausible llama2.c header (dim={dim}, hidden_dim={hidden_dim}, "
            f"n_layers={n_layers}, n_heads={n_heads}, n_kv_heads={n_kv_heads}, "
            f"vocab_size={signed_vocab}, seq_len={seq_len})"
        )
    head_size = dim // n_heads
    kv_dim = n_kv_heads * head_size

    weights = torch.from_numpy(np.fromfile(path, dtype="<f4", offset=HEADER.size))
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("embedding", (vocab_size, dim)),
        ("attention_norm", (n_layers, dim)),
        ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv_dim, dim)),
        ("wv", (n_layers, kv_dim, dim)),
        ("wo", (n_layers, dim, dim)),
        ("ffn_norm", (n_layers, dim)),
        ("w1", (n_layers, hidden_dim, dim)),
        ("w2", (n_layers, dim, hidden_dim)),
        ("w3", (n_layers, hidden_dim, dim)),
        ("final_norm", (dim,)),
        # run.c's precomputed RoPE tables: unused, transformers computes its own.
        ("freq_cis_real", (seq_len * head_size // 2,)),
        ("freq_cis_imag", (seq_len * head_size // 2,)),
    ]
    if not shared_classifier:
        shapes.append(("classifier", (vocab_size, dim)))
    expected = sum(int(np.prod(shape)) for _, shape in shapes)
    if weights.numel() != expected:
        raise ValueError(
            f"{path}: header promises {expected} float32 weights but the file holds "
            f"{weights.numel()}; not a legacy llama2.c checkpoint or truncated"
        )
    tensors: dict[str, Any] = {}
    offset = 0
    for name, shape in shapes:
        size = int(np.prod(shape))
        tensors[name] = weights[offset : offset + size].reshape(shape)
        offset += size

    state: dict[str, Any] = {"model.embed_tokens.weight": tensors["embedding"]}
    for layer in range(n_layers):
        prefix = f"model.layers.{layer}."
        state[prefix + "input_layernorm.weight"] = tensors["attention_norm"][layer]
        state[prefix + "self_attn.q_proj.weight"] = _interleaved_to_halves(
            tensors["wq"][layer], n_heads)
        state[prefix + "self_attn.k_proj.weight"] = _interleaved_to_halves(
            tensors["wk"][layer], n_kv_heads)
        state[prefix + "self_attn.v_proj.weight"] = tensors["wv"][layer]
        state[prefix + "self_attn.o_proj.weight"] = tensors["wo"][layer]
        state[prefix + "post_attention_layernorm.weight"] = tensors["ffn_norm"][layer]
        state[prefix + "mlp.gate_proj.weight"] = tensors["w1"][layer]
        state[prefix + "mlp.down_proj.weight"] = tensors["w2"][layer]
        state[prefix + "mlp.up_proj.weight"] = tensors["w3"][layer]
    state["model.norm.weight"] = tensors["final_norm"]
    state["lm_head.weight"] = tensors["embedding" if shared_classifier else "classifier"]
    # Own the memory so the returned tensors do not pin the whole file buffer.
    state = {name: tensor.contiguous().clone() for name, tensor in state.items()}

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=dim,
        intermediate_size=hidden_dim,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=head_size,
        hidden_act="silu",
        max_position_embeddings=seq_len,
        rms_norm_eps=1e-5,  # run.c's rmsnorm epsilon
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=shared_classifier,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=None,
        architectures=["LlamaForCausalLM"],
    )
    return config, state


def _interleaved_to_halves(weight: Any, n_heads: int) -> Any:
    # llama2.c rotates pairs (2i, 2i+1) of each head; transformers rotates (i, i + d/2).
    # Reordering each head's rows to [0, 2, 4, …, 1, 3, 5, …] makes the two agree.
    rows, columns = weight.shape
    head_size = rows // n_heads
    return (weight.reshape(n_heads, head_size // 2, 2, columns)
            .transpose(1, 2).reshape(rows, columns))


def load_llama2c(path: str, dtype: str | None = None, device: str = "cpu") -> LoadedModel:
    """Load a llama2.c checkpoint (see :func:`find_llama2c_files`) as ``LlamaForCausalLM``.

    The model is in eval mode on ``device`` in ``dtype`` (None → float32), with a
    :class:`Llama2cTokenizer`.
    """
    from transformers import LlamaForCausalLM

    from workers.models.hf import torch_dtype

    model_bin, tokenizer_bin = find_llama2c_files(path)
    config, state = convert_llama2c(model_bin)
    tokenizer = Llama2cTokenizer(tokenizer_bin, vocab_size=config.vocab_size)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Only a tied lm_head may be absent from the reported keys; anything else is a bug.
    missing = [key for key in missing if not (config.tie_word_embeddings and key.startswith(
        "lm_head."))]
    if missing or unexpected:
        raise RuntimeError(f"llama2c conversion mismatch: missing {missing}, "
                           f"unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.to(device=device, dtype=torch_dtype(dtype))
    model.eval()
    info = {
        "format": "llama2c",
        "model_bin": str(model_bin),
        "tokenizer_bin": str(tokenizer_bin),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seq_len": config.max_position_embeddings,
        "tied_embeddings": bool(config.tie_word_embeddings),
    }
    return LoadedModel(model=model, tokenizer=tokenizer, family=family_for(model),
                       source=f"llama2c:{path}", info=info)


def save_as_transformers(path: str, out_dir: str | Path) -> Path:
    """Write the llama2.c checkpoint at ``path`` as a transformers checkpoint in ``out_dir``.

    ``out_dir`` gets ``config.json``, ``generation_config.json`` and safetensors weights
    (float32), loadable with stock ``LlamaForCausalLM.from_pretrained``. There is no
    transformers tokenizer: the llama2.c tokenizer ``.bin`` is copied beside the weights
    under its own name; read it with :class:`Llama2cTokenizer`. Returns ``out_dir``.
    """
    loaded = load_llama2c(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(out)
    tokenizer_bin = Path(loaded.info["tokenizer_bin"])
    shutil.copyfile(tokenizer_bin, out / tokenizer_bin.name)
    return out
