"""Shared base of vision-language families (LLaVA, Qwen2.5-VL).

A transformers 5 image-text-to-text model is ``XForConditionalGeneration`` with
``model`` (``XModel``: the vision encoder, a projector, and ``language_model``, a
text decoder *without* LM head) and ``lm_head`` beside it. Every text-side accessor of
:class:`workers.models.ModelFamily` refers to ``model.model.language_model``, whose
config is ``model.config.text_config``; per-layer parts (attention, MLP, norms) are
delegated to the adapter of the text decoder's own family, so a LLaVA built on Llama,
Mistral or Qwen2 is handled by the adapter that handles that decoder on its own.
"""

from __future__ import annotations

from typing import Any

from workers.models import ModelFamily, family_for_model_type


class VisionLanguageFamily(ModelFamily):
    """Base of image-text-to-text families; subclasses say where the vision side is."""

    is_vision_language = True
    text_layouts: dict[str, str] = {}
    """Text ``model_type`` → the registered model type whose adapter handles its layers,
    for text decoders that exist only inside a VLM (``qwen2_5_vl_text`` → ``qwen2``)."""

    def text_family(self, model: Any) -> ModelFamily:
        """The adapter of the language model's own architecture."""
        return self._family_of(getattr(self.text_config(model), "model_type", None))

    def _family_of(self, model_type: str | None) -> ModelFamily:
        return family_for_model_type(self.text_layouts.get(model_type or "", model_type))

    def language_model(self, model: Any) -> Any:
        return model.model.language_model

    def text_config(self, model: Any) -> Any:
        return model.config.text_config

    def image_token_id(self, model: Any) -> int:
        return int(model.config.image_token_id)

    # Per-layer parts: the text decoder's family knows its layers.

    def attention(self, layer: Any) -> Any:
        return self._layer_family(layer).attention(layer)

    def attention_projections(self, layer: Any) -> dict[str, Any]:
        return self._layer_family(layer).attention_projections(layer)

    def attention_output_projection(self, layer: Any) -> Any:
        return self._layer_family(layer).attention_output_projection(layer)

    def mlp(self, layer: Any) -> Any:
        return self._layer_family(layer).mlp(layer)

    def mlp_projections(self, layer: Any) -> dict[str, Any]:
        return self._layer_family(layer).mlp_projections(layer)

    def norms(self, layer: Any) -> dict[str, Any]:
        return self._layer_family(layer).norms(layer)

    def _layer_family(self, layer: Any) -> ModelFamily:
        """The family of a decoder layer, from the layer's own attention config.

        Layer-level calls get only the layer, not the model; the attention module keeps
        the (text) config it was built from, which names the architecture.
        """
        config = getattr(getattr(layer, "self_attn", None), "config", None)
        return self._family_of(getattr(config, "model_type", None))
