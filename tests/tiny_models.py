"""Tiny random checkpoints of every supported model family, built offline.

Each ``build_*`` function creates a randomly initialised model of one family from its
config (hidden size 32-64, 2-4 layers, a few heads with grouped-query attention where
the family has it, a vocabulary of 256 bytes plus the family's special tokens), seeded
with ``torch.manual_seed``, and saves it with ``save_pretrained`` into ``directory``
together with a tokenizer built with the ``tokenizers`` library (byte-level, no
merges, so every string round-trips) and, for vision-language models, an image
processor and a processor constructed from arguments (nothing is downloaded).

The image processors are the PIL backends (``CLIPImageProcessorPil``,
``Qwen2VLImageProcessorPil``): in transformers 5 the default classes
(``CLIPImageProcessor``, ``Qwen2VLImageProcessor``) are torchvision backends, and
torchvision is not a dependency of this project. For the same reason the Qwen2.5-VL
processor is built with :func:`workers.models.hf.image_only_processor_class` when
torchvision is missing; it saves as a standard ``Qwen2_5_VLProcessor``.

Used by ``tests/workers/models/conftest.py`` (session fixtures) and importable from any
test (``tests/`` is on ``sys.path``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
LLAVA_IMAGE_TOKEN = "<image>"
QWEN_VL_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")

# Modelled on llava-hf's LLaVA-1.5 chat template ("USER: <image>\n… ASSISTANT:").
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Modelled on Qwen2.5-VL's chat template, for text and images only.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer(extra_special_tokens: tuple[str, ...] = ()) -> Any:
    """A ``PreTrainedTokenizerFast``: 256 byte tokens, then ``<s> </s> <pad>`` and extras.

    Byte-level with no merges: any text encodes (one token per UTF-8 byte) and decodes
    back exactly, and every special token is a single id.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                     use_regex=False)
    backend.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, PAD, *extra_special_tokens]
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD)


def _vocab_size(tokenizer: Any) -> int:
    """Embedding rows for ``tokenizer``: its length rounded up to a multiple of 8."""
    return (len(tokenizer) + 7) // 8 * 8


def _special_ids(tokenizer: Any) -> dict[str, int]:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def _save(model: Any, tokenizer: Any, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_llama(directory: Path, seed: int = 0, layers: int = 4) -> Path:
    """Llama: 4 layers (or ``layers``), 4 query heads sharing 2 KV heads, hidden 32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = LlamaConfig(vocab_size=_vocab_size(tokenizer), hidden_size=32,
                         intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         **_special_ids(tokenizer))
    torch.manual_seed(seed)
    return _save(LlamaForCausalLM(config), tokenizer, directory)


def build_mistral(directory: Path, seed: int = 0) -> Path:
    """Mistral: the Llama layout with a sliding window, 3 layers, GQA 4/2, hidden 32."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = byte_tokenizer()
    config = MistralConfig(vocab_size=_vocab_size(tokenizer), hidden_size=32,
                           intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, sliding_window=16,
                           tie_word_embeddings=False, **_special_ids(tokenizer))
    torch.manual_seed(seed)
    return _save(MistralForCausalLM(config), tokenizer, directory)


def build_qwen2(directory: Path, seed: int = 0) -> Path:
    """Qwen2: biases on q/k/v, 3 layers, 4 query heads sharing 2 KV heads."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = byte_tokenizer()
    config = Qwen2Config(vocab_size=_vocab_size(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=False,
                         **_special_ids(tokenizer))
    torch.manual_seed(seed)
    return _save(Qwen2ForCausalLM(config), tokenizer, directory)


def build_qwen3(directory: Path, seed: int = 0) -> Path:
    """Qwen3: q_norm/k_norm, head_dim (16) set apart from hidden/heads (32/4 = 8)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = byte_tokenizer()
    config = Qwen3Config(vocab_size=_vocab_size(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=128, tie_word_embeddings=True,
                         **_special_ids(tokenizer))
    torch.manual_seed(seed)
    return _save(Qwen3ForCausalLM(config), tokenizer, directory)


# Sliding and global layers alternate, so keeping layers by position (not a prefix of
# layer_types) makes a visible difference after dropping the first layer.
EXAONE4_LAYER_TYPES = ("sliding_attention", "full_attention", "sliding_attention",
                       "full_attention")


def build_exaone4(directory: Path, seed: int = 0) -> Path:
    """EXAONE 4: post-LN, QK-norm, alternating sliding-window (RoPE) / global (NoPE) layers."""
    import torch
    from transformers import Exaone4Config, Exaone4ForCausalLM

    tokenizer = byte_tokenizer()
    config = Exaone4Config(vocab_size=_vocab_size(tokenizer), hidden_size=32,
                           intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                           sliding_window=4, layer_types=list(EXAONE4_LAYER_TYPES),
                           **_special_ids(tokenizer))
    torch.manual_seed(seed)
    return _save(Exaone4ForCausalLM(config), tokenizer, directory)


def build_mamba(directory: Path, seed: int = 0) -> Path:
    """Mamba: 2 blocks, hidden 32, state 8 (no attention)."""
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    tokenizer = byte_tokenizer()
    config = MambaConfig(vocab_size=_vocab_size(tokenizer), hidden_size=32, state_size=8,
                         num_hidden_layers=2, expand=2, conv_kernel=4,
                         **_special_ids(tokenizer))
    torch.manual_seed(seed)
    return _save(MambaForCausalLM(config), tokenizer, directory)


LLAVA_IMAGE_SIZE = 32
LLAVA_PATCH_SIZE = 8


def build_llava(directory: Path, seed: int = 0) -> Path:
    """LLaVA: a 2-layer CLIP vision tower (32×32 images, 8×8 patches → 16 image tokens),
    a Llama text model with GQA, the ``<image>`` token, a CLIP image processor."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = byte_tokenizer((LLAVA_IMAGE_TOKEN,))
    image_token_id = tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN)
    text = LlamaConfig(vocab_size=_vocab_size(tokenizer), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, **_special_ids(tokenizer))
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=LLAVA_IMAGE_SIZE,
                              patch_size=LLAVA_PATCH_SIZE, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": LLAVA_IMAGE_SIZE},
        crop_size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=LLAVA_PATCH_SIZE,
                               # CLIP's CLS token, which the "default" strategy then drops.
                               num_additional_image_tokens=1,
                               vision_feature_select_strategy="default",
                               chat_template=LLAVA_CHAT_TEMPLATE)
    _save(model, tokenizer, directory)
    processor.save_pretrained(directory)
    return directory


QWEN_VL_PATCH_SIZE = 4
QWEN_VL_MERGE_SIZE = 2


def build_qwen2_5_vl(directory: Path, seed: int = 0) -> Path:
    """Qwen2.5-VL: a 2-block vision transformer (4×4 patches, 2×2 merge), a 3-layer text
    model with GQA and M-RoPE, the vision special tokens, a Qwen2-VL image processor."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.utils import is_torchvision_available

    from workers.models.hf import image_only_processor_class

    tokenizer = byte_tokenizer(QWEN_VL_TOKENS)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_VL_TOKENS}
    text = dict(vocab_size=_vocab_size(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512,
                # head_dim 16 → 8 rotary frequencies split over (time, height, width).
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 3, 3]},
                **_special_ids(tokenizer))
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                  patch_size=QWEN_VL_PATCH_SIZE, spatial_merge_size=QWEN_VL_MERGE_SIZE,
                  temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1],
                  out_hidden_size=64)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                              image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"],
                              vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    factor = QWEN_VL_PATCH_SIZE * QWEN_VL_MERGE_SIZE
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=QWEN_VL_PATCH_SIZE, merge_size=QWEN_VL_MERGE_SIZE, temporal_patch_size=2,
        min_pixels=(2 * factor) ** 2, max_pixels=(4 * factor) ** 2)
    processor_class = Qwen2_5_VLProcessor
    if not is_torchvision_available():
        # Stock Qwen2_5_VLProcessor insists on a (torchvision-only) video processor.
        processor_class = image_only_processor_class(Qwen2_5_VLProcessor)
    processor = processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=QWEN_VL_CHAT_TEMPLATE)
    _save(model, tokenizer, directory)
    processor.save_pretrained(directory)
    return directory


TEXT_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "exaone4", "mamba")
VISION_LANGUAGE_MODEL_TYPES = ("llava", "qwen2_5_vl")
ALL_MODEL_TYPES = TEXT_MODEL_TYPES + VISION_LANGUAGE_MODEL_TYPES
ATTENTION_MODEL_TYPES = tuple(t for t in ALL_MODEL_TYPES if t != "mamba")

BUILDERS: dict[str, Callable[[Path], Path]] = {
    "llama": build_llama,
    "mistral": build_mistral,
    "qwen2": build_qwen2,
    "qwen3": build_qwen3,
    "exaone4": build_exaone4,
    "mamba": build_mamba,
    "llava": build_llava,
    "qwen2_5_vl": build_qwen2_5_vl,
}
"""Builder of each tiny checkpoint, by the ``model_type`` it produces."""


def build_all(root: Path) -> dict[str, Path]:
    """Every tiny checkpoint, each in ``root/<model_type>``."""
    return {name: build(root / name) for name, build in BUILDERS.items()}


def probe_image(width: int = 24, height: int = 20, seed: int = 0) -> Any:
    """A small RGB ``PIL.Image`` of seeded noise over a gradient (not a constant image)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 255, width, dtype=np.float64)[None, :, None]
    pixels = np.clip(gradient + rng.normal(0, 40, (height, width, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8), mode="RGB")
