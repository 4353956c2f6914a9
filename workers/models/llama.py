"""Llama-architecture family (LlamaForCausalLM and its close relatives)."""

from __future__ import annotations

from typing import Any

from workers.models import ModelFamily, register_model_family


@register_model_family("llama")
class LlamaFamily(ModelFamily):
    """Decoder layers at ``model.model.layers``; attention ``q/k/v/o_proj`` per layer."""

    model_types = ("llama", "mistral")

    def decoder_layers(self, model: Any) -> Any:
        return model.model.layers

    def set_decoder_layers(self, model: Any, layers: list[Any]) -> None:
        import torch

        for index, layer in enumerate(layers):
            # The KV cache is indexed by layer_idx; a stale index after dropping layers
            # would make generation read another layer's cache.
            layer.self_attn.layer_idx = index
        model.model.layers = torch.nn.ModuleList(layers)
        config = model.config
        kept_types = getattr(config, "layer_types", None)
        config.num_hidden_layers = len(layers)
        if kept_types is not None:
            config.layer_types = list(kept_types)[: len(layers)]

    def attention(self, layer: Any) -> Any:
        return layer.self_attn

    def num_heads(self, model: Any) -> int:
        return int(model.config.num_attention_heads)

    def num_kv_heads(self, model: Any) -> int:
        config = model.config
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)

    def head_dim(self, model: Any) -> int:
        config = model.config
        return int(getattr(config, "head_dim", None)
                   or config.hidden_size // config.num_attention_heads)

    def attention_output_projection(self, layer: Any) -> Any:
        return layer.self_attn.o_proj
