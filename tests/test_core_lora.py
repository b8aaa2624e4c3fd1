"""core.lora against PEFT itself: pattern keys match what PEFT matches, the scale is the one PEFT applies."""
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils.other import get_pattern_key

from core.lora import (DEFAULT_TARGET_MODULES, full_tensor, lora_config_from_dict, lora_config_to_dict,
                       lora_scale, pattern_matches)

NAMES = ["model.layers.0.mlp.down_proj", "model.layers.10.mlp.down_proj", "model.layers.1.self_attn.q_proj"]


@pytest.mark.parametrize("key", [r"model\.layers\.0\.mlp\.down_proj", "down_proj", r"layers\.1\..*", "q_proj"])
def test_pattern_keys_match_what_peft_matches(key):
    for name in NAMES:
        # PEFT answers the key it picks for a module, or the module name itself when none matches.
        assert pattern_matches(key, name) == (get_pattern_key([key], name) == key)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))


@pytest.mark.parametrize("rslora", [False, True])
def test_scale_is_the_one_peft_applies(rslora):
    cfg = LoraConfig(r=8, lora_alpha=12, target_modules=list(DEFAULT_TARGET_MODULES), use_rslora=rslora,
                     rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 5})
    model = get_peft_model(_tiny_llama(), cfg)
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "scaling") and "default" in getattr(m, "r", {})}
    assert {n.rsplit(".", 1)[-1] for n in layers} == set(DEFAULT_TARGET_MODULES)
    for name, layer in layers.items():
        rank, alpha = (2, 5) if name.endswith("down_proj") else (8, 12)
        assert layer.scaling["default"] == pytest.approx(lora_scale(rank, alpha, rslora))


def test_config_json_round_trip_and_full_tensor_of_a_plain_tensor():
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules={"q_proj", "v_proj"}, rank_pattern={"q_proj": 2})
    d = lora_config_to_dict(cfg)
    assert json.loads(json.dumps(d)) == d and d["target_modules"] == ["q_proj", "v_proj"]
    back = lora_config_from_dict(d)
    assert (back.r, back.lora_alpha, set(back.target_modules), back.rank_pattern) == (4, 8, {"q_proj", "v_proj"},
                                                                                      {"q_proj": 2})
    p = torch.nn.Parameter(torch.randn(3, 2))
    got = full_tensor(p)
    assert torch.equal(got, p) and not got.requires_grad


def test_shard_numels_is_dtensor_shard0_split():
    from core.lora import shard_numels

    for rows in range(0, 9):
        for parts in range(1, 5):
            t = torch.zeros(rows, 3)
            chunks = [c.numel() for c in torch.chunk(t, parts)] if rows else []
            assert shard_numels((rows, 3), parts) == chunks + [0] * (parts - len(chunks)), (rows, parts)
