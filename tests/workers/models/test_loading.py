"""Loading options and the auto class chosen from a checkpoint's config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, Gemma3Config, Gemma3TextConfig, LlamaConfig

from workers.models.hf import auto_class_name

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("model_type,expected", [
    ("llama", "AutoModelForCausalLM"), ("qwen2", "AutoModelForCausalLM"),
    ("qwen3", "AutoModelForCausalLM"), ("exaone4", "AutoModelForCausalLM"),
    ("mamba", "AutoModelForCausalLM"), ("llava", "AutoModelForImageTextToText"),
    ("qwen2_5_vl", "AutoModelForImageTextToText"),
])
def test_auto_class_follows_the_saved_config(tiny_checkpoint, model_type, expected):
    assert auto_class_name(AutoConfig.from_pretrained(tiny_checkpoint(model_type))) == expected


def test_auto_class_of_types_in_both_mappings_and_remote_code():
    # Gemma 3 is in both mappings: the multimodal config is image-text-to-text.
    assert auto_class_name(Gemma3Config()) == "AutoModelForImageTextToText"
    assert auto_class_name(Gemma3TextConfig()) == "AutoModelForCausalLM"
    remote = LlamaConfig()
    remote.auto_map = {"AutoModelForImageTextToText": "modeling_x.XForConditionalGeneration"}
    assert auto_class_name(remote) == "AutoModelForImageTextToText"


@pytest.mark.parametrize("model_type", ["qwen3", "llava"])
def test_attn_implementation_reaches_the_model(tiny_loaded, model_type):
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    eager = tiny_loaded(model_type, attn_implementation="eager")
    assert eager.info["attn_implementation"] == "eager"
    with torch.no_grad():
        attentions = eager.model(input_ids=ids, output_attentions=True).attentions
    layers = eager.family.num_layers(eager.model)
    assert len(attentions) == layers and all(a is not None for a in attentions)
    # Rows of attention weights are distributions over the (causal) keys.
    torch.testing.assert_close(attentions[0].sum(-1), torch.ones(attentions[0].shape[:-1]))
    sdpa = tiny_loaded(model_type, attn_implementation="sdpa")
    assert sdpa.model.config._attn_implementation == "sdpa"


def test_text_models_carry_no_processor(tiny_loaded):
    loaded = tiny_loaded("llama")
    assert loaded.processor is None
    assert loaded.info["auto_class"] == "AutoModelForCausalLM"


def test_family_registry_and_checks_stay_light():
    """The driver validates specs with these; they must not import torch/transformers."""
    code = ("import sys\nimport workers.models as m\nm.model_families()\n"
            "m.check_model_id('org/some-model')\nm.check_model_id('hub:org/x', revision='v1')\n"
            "print(','.join(n for n in ('torch', 'transformers', 'tokenizers') "
            "if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == ""
