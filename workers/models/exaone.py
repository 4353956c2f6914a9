"""EXAONE 4 (``Exaone4ForCausalLM``, native in transformers).

Llama's module names for attention and MLP, but *post*-LN: each sub-block's output is
normalised (``post_attention_layernorm``, ``post_feedforward_layernorm``) before it is
added to the residual stream, and there is no input norm. Attention has QK-norm, and
layers alternate between sliding-window attention with RoPE and global attention
without positional encoding, as ``config.layer_types`` says; each attention module
fixes its kind (``is_sliding``) when built from its index in that list, which is why
removing layers must keep the kept layers' entries (done by
:meth:`ModelFamily.set_decoder_layers`).
"""

from __future__ import annotations

from typing import Any

from workers.models import register_model_family
from workers.models.llama import LlamaFamily


@register_model_family("exaone4")
class Exaone4Family(LlamaFamily):
    """EXAONE 4: post-LN decoder layers with QK-norm and sliding/global layer types."""

    model_types = ("exaone4",)
    is_post_norm = True

    def norms(self, layer: Any) -> dict[str, Any]:
        return {"post_attention_layernorm": layer.post_attention_layernorm,
                "post_feedforward_layernorm": layer.post_feedforward_layernorm,
                "self_attn.q_norm": layer.self_attn.q_norm,
                "self_attn.k_norm": layer.self_attn.k_norm}
