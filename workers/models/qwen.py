"""Qwen2 and Qwen3 (``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``).

Llama's layout (:class:`workers.models.llama.LlamaFamily`) with two differences that
matter to methods: Qwen2 has biases on ``q/k/v_proj`` (a masked head's value bias is
still mixed by ``o_proj`` unless its columns are zeroed, which ``head_mask`` does),
and Qwen3 normalises each query/key head (``self_attn.q_norm`` / ``k_norm``) and sets
``head_dim`` independently of ``hidden_size / num_attention_heads``.
"""

from __future__ import annotations

from typing import Any

from workers.models import register_model_family
from workers.models.llama import LlamaFamily


@register_model_family("qwen")
class QwenFamily(LlamaFamily):
    """Qwen2 / Qwen3: Llama layout, plus QK-norm on Qwen3."""

    model_types = ("qwen2", "qwen3")

    def norms(self, layer: Any) -> dict[str, Any]:
        norms = super().norms(layer)
        attention = layer.self_attn
        for name in ("q_norm", "k_norm"):  # Qwen3 only
            if hasattr(attention, name):
                norms[f"self_attn.{name}"] = getattr(attention, name)
        return norms
