"""Loading transformers checkpoints (local directories or hub ids)."""

from __future__ import annotations

from typing import Any

from workers.models import LoadedModel, family_for

DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "auto": "auto"}


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


def load_hf_model(path: str, dtype: str | None = None, device: str = "cpu",
                  trust_remote_code: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer with transformers, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code
    )
    model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return LoadedModel(model=model, tokenizer=HFTokenizer(tokenizer), family=family_for(model),
                       source=path)
