"""Loading transformers checkpoints (local directories or hub ids).

The auto class follows the checkpoint's config: image-text-to-text models (LLaVA,
Qwen2.5-VL, …) load with ``AutoModelForImageTextToText`` and ``AutoProcessor``, every
other model with ``AutoModelForCausalLM`` and ``AutoTokenizer``.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from workers.models import LoadedModel, family_for
from workers.models.structure import has_structure, load_structured_model

DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "auto": "auto"}

CAUSAL_LM = "AutoModelForCausalLM"
IMAGE_TEXT_TO_TEXT = "AutoModelForImageTextToText"


class HFTokenizer:
    """Adapter from a transformers tokenizer to :class:`workers.models.TextTokenizer`."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def save_pretrained(self, path: str) -> None:
        self._tok.save_pretrained(path)


def torch_dtype(name: str | None) -> Any:
    """The torch dtype for a spec dtype name (None → float32)."""
    import torch

    return {None: torch.float32, "float32": torch.float32, "float16": torch.float16,
            "bfloat16": torch.bfloat16}[name]


def auto_class_name(config: Any) -> str:
    """``AutoModelForImageTextToText`` or ``AutoModelForCausalLM`` for a checkpoint config.

    A remote-code checkpoint says which auto classes it supports in ``auto_map``;
    otherwise the model type's entry in transformers' image-text-to-text mapping decides.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    auto_map = getattr(config, "auto_map", None) or {}
    if IMAGE_TEXT_TO_TEXT in auto_map:
        return IMAGE_TEXT_TO_TEXT
    if CAUSAL_LM in auto_map:
        return CAUSAL_LM
    model_type = getattr(config, "model_type", None)
    if (model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
            and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        return IMAGE_TEXT_TO_TEXT
    if (model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
            and getattr(config, "vision_config", None) is not None):
        return IMAGE_TEXT_TO_TEXT  # in both mappings (Gemma 3): the multimodal checkpoint
    return CAUSAL_LM


@cache
def image_only_processor_class(processor_class: type) -> type:
    """``processor_class`` without its video processor, for machines without torchvision.

    In transformers 5 every video processor is a torchvision backend, and a processor
    whose ``__init__`` takes ``video_processor`` (Qwen2-VL, Qwen2.5-VL, …) refuses to be
    built or loaded without one, even for images and text. This subclass leaves the
    video processor out of the processor's attributes (``video_processor`` is None), so
    images and text go through the stock code and video inputs are refused. It keeps
    its base's name so that what it saves is a standard checkpoint of the base class.
    """

    def get_attributes(cls: type) -> list[str]:
        return [name for name in super(subclass, cls).get_attributes()
                if name != "video_processor"]

    subclass = type(processor_class.__name__, (processor_class,), {
        "__doc__": f"{processor_class.__name__} for images and text only (no torchvision).",
        "__module__": __name__,
        "video_processor": None,
        "get_attributes": classmethod(get_attributes),
    })
    return subclass


def load_processor(path: str, config: Any, *, trust_remote_code: bool = False,
                   revision: str | None = None) -> tuple[Any, dict[str, Any]]:
    """The processor of a vision-language checkpoint and facts about how it was loaded.

    ``AutoProcessor`` where it can load; where torchvision is missing and the model
    type's processor needs a video processor, the image-and-text processor of
    :func:`image_only_processor_class` (recorded as ``processor_videos: False``).
    """
    from transformers import AutoProcessor
    from transformers.models.auto.processing_auto import (
        PROCESSOR_MAPPING_NAMES,
        processor_class_from_name,
    )
    from transformers.utils import is_torchvision_available

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision is not None:
        kwargs["revision"] = revision
    class_name = PROCESSOR_MAPPING_NAMES.get(getattr(config, "model_type", None))
    processor_class = processor_class_from_name(class_name) if class_name else None
    needs_video = (processor_class is not None
                   and "video_processor" in processor_class.get_attributes())
    if needs_video and not is_torchvision_available():
        processor = image_only_processor_class(processor_class).from_pretrained(path, **kwargs)
        return processor, {"processor_videos": False,
                           "processor_note": "torchvision is not installed: images and text "
                                             "only, video inputs are not supported"}
    processor = AutoProcessor.from_pretrained(path, **kwargs)
    return processor, {"processor_videos": needs_video}


def load_hf_model(path: str, dtype: str | None = None, device: str = "cpu",
                  trust_remote_code: bool = False, attn_implementation: str | None = None,
                  revision: str | None = None) -> LoadedModel:
    """Load a checkpoint with transformers, in eval mode on ``device``.

    Causal LMs come with their tokenizer; image-text-to-text models also with their
    processor (``LoadedModel.processor``, whose tokenizer is ``LoadedModel.tokenizer``).
    ``attn_implementation`` and ``revision`` go to ``from_pretrained`` when given. A
    checkpoint whose config records per-layer sizes (``compress_sweep_structure``, written
    by structural pruning) loads through :func:`workers.models.structure.load_structured_model`.
    """
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    options: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision is not None:
        options["revision"] = revision
    config = AutoConfig.from_pretrained(path, **options)
    auto_class = auto_class_name(config)
    model_options = dict(options, dtype=torch_dtype(dtype))
    if attn_implementation is not None:
        model_options["attn_implementation"] = attn_implementation
    if has_structure(config):  # per-layer sizes (structural pruning): shaped before loading
        model = load_structured_model(getattr(transformers, auto_class), path, config,
                                      **model_options)
    else:
        model = getattr(transformers, auto_class).from_pretrained(path, **model_options)
    model.to(device)
    model.eval()
    processor = None
    info: dict[str, Any] = {"auto_class": auto_class,
                            "attn_implementation": model.config._attn_implementation}
    if revision is not None:
        info["revision"] = revision
    if auto_class == IMAGE_TEXT_TO_TEXT:
        processor, processor_info = load_processor(path, config,
                                                   trust_remote_code=trust_remote_code,
                                                   revision=revision)
        info.update(processor_info)
        tokenizer = processor.tokenizer
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, **options)
    family = family_for(model)
    info.update(family.runtime_info(model))
    return LoadedModel(model=model, tokenizer=HFTokenizer(tokenizer), family=family,
                       source=path, info=info, processor=processor)
