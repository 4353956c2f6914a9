"""Llama-architecture family (LlamaForCausalLM and its close relatives).

The layout most decoder-only models share, and the base of the Qwen and EXAONE
adapters: ``model.model`` holds ``embed_tokens``, ``layers`` and ``norm``; each layer
has ``self_attn`` (``q/k/v/o_proj``), ``mlp`` (``gate/up/down_proj``) and the pre-norms
``input_layernorm`` / ``post_attention_layernorm``.
"""

from __future__ import annotations

from typing import Any

from workers.models import ModelFamily, register_model_family


@register_model_family("llama")
class LlamaFamily(ModelFamily):
    """Decoder layers at ``model.model.layers``; attention ``q/k/v/o_proj`` per layer."""

    model_types = ("llama", "mistral")

    def language_model(self, model: Any) -> Any:
        return model.model

    def attention(self, layer: Any) -> Any:
        return layer.self_attn

    def attention_projections(self, layer: Any) -> dict[str, Any]:
        attention = layer.self_attn
        return {"q": attention.q_proj, "k": attention.k_proj, "v": attention.v_proj,
                "o": attention.o_proj}

    def mlp(self, layer: Any) -> Any:
        return layer.mlp

    def mlp_projections(self, layer: Any) -> dict[str, Any]:
        mlp = layer.mlp
        return {"gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}

    def norms(self, layer: Any) -> dict[str, Any]:
        return {"input_layernorm": layer.input_layernorm,
                "post_attention_layernorm": layer.post_attention_layernorm}
