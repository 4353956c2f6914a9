"""LLaVA (llava-hf ``LlavaForConditionalGeneration``).

Paths checked in transformers 5.23 ``modeling_llava``: ``model.model.vision_tower``
(a CLIP/SigLIP vision model), ``model.model.multi_modal_projector`` (two linears),
``model.model.language_model`` (the text decoder built with ``AutoModel`` from
``config.text_config``: ``LlamaModel`` for LLaVA-1.5) and ``model.lm_head``. The
processor expands each ``<image>`` in the prompt into one ``config.image_token_id``
per image feature, and the model overwrites the embeddings at exactly those positions
(``input_ids == config.image_token_id``).
"""

from __future__ import annotations

from typing import Any

from workers.models import register_model_family
from workers.models.vision_language import VisionLanguageFamily


@register_model_family("llava")
class LlavaFamily(VisionLanguageFamily):
    """LLaVA: vision tower + projector + a text decoder handled by its own family."""

    model_types = ("llava",)

    def vision_tower(self, model: Any) -> Any:
        return model.model.vision_tower

    def multimodal_projector(self, model: Any) -> Any:
        return model.model.multi_modal_projector

    def runtime_info(self, model: Any) -> dict[str, Any]:
        return {"text_family": self.text_family(model).name}
