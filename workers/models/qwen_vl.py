"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``).

Paths checked in transformers 5.23 ``modeling_qwen2_5_vl``: ``model.model.visual``
(the vision transformer, ending in ``merger``, the patch merger that projects into the
text embedding space), ``model.model.language_model`` (``Qwen2_5_VLTextModel``, config
``model.config.text_config``, model type ``qwen2_5_vl_text``) and ``model.lm_head``.
Text decoder layers have Qwen2's layout (biased ``q/k/v_proj``, ``gate/up/down_proj``,
pre-norms) and are handled by the Qwen adapter. The attention's ``head_dim`` is
``hidden_size // num_attention_heads`` whatever the config says, so
:meth:`ModelFamily.head_dim` reads it from the module.

Inputs with images need the processor's ``mm_token_type_ids`` (for the 3-D M-RoPE
positions) besides ``pixel_values`` and ``image_grid_thw``; each image becomes
``<|vision_start|>``, one ``<|image_pad|>`` (``config.image_token_id``) per merged patch,
``<|vision_end|>``, and only the ``<|image_pad|>`` positions receive image features.
"""

from __future__ import annotations

from typing import Any

from workers.models import register_model_family
from workers.models.vision_language import VisionLanguageFamily


@register_model_family("qwen2_5_vl")
class Qwen2_5_VLFamily(VisionLanguageFamily):
    """Qwen2.5-VL: vision transformer + patch merger + a Qwen2-layout text decoder."""

    model_types = ("qwen2_5_vl",)
    text_layouts = {"qwen2_5_vl_text": "qwen2"}

    def vision_tower(self, model: Any) -> Any:
        return model.model.visual

    def multimodal_projector(self, model: Any) -> Any:
        return model.model.visual.merger

    def runtime_info(self, model: Any) -> dict[str, Any]:
        return {"text_family": self.text_family(model).name}
