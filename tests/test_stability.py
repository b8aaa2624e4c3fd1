"""PAGE stability: disjoint probe sets, the top modules per set, agreement, and the command on
the tiny Llama at step 0 and at a checkpoint whose adapter is merged in."""
from __future__ import annotations

import json

import pytest

from placement.stability import agreement, disjoint_sets, summarise, tops


def test_disjoint_sets_and_agreement():
    sets = disjoint_sets(100, 5, 20, seed=0)
    flat = [i for s in sets for i in s]
    assert len(sets) == 5 and len(flat) == len(set(flat)) == 100 and disjoint_sets(100, 5, 20, seed=0) == sets
    with pytest.raises(ValueError, match="need 120 rows and the data has 100"):
        disjoint_sets(100, 6, 20, seed=0)
    assert agreement(["a", "b", "a"]) == {"modal": "a", "count": 2, "of": 3}
    t = tops({"m.layers.0.self_attn.v_proj": 5.0, "m.layers.0.mlp.down_proj": 1.0, "m.layers.1.mlp.down_proj": 3.0,
              "m.layers.1.self_attn.v_proj": 1.0})
    assert t["global"] == "m.layers.0.self_attn.v_proj" and t["down_proj"] == "m.layers.1.mlp.down_proj"
    assert t["global_share"] == pytest.approx(0.5) and t["down_proj_share_in_type"] == pytest.approx(0.75)
    s = summarise({"a": [t, t], "b": [{**t, "down_proj": "x"}]})
    assert s["policies"]["a"]["down_proj"] == {"modal": "m.layers.1.mlp.down_proj", "count": 2, "of": 2}
    assert s["across_policies_down_proj"]["of"] == 2 and s["across_policies_global"]["count"] == 2


def test_stability_command_at_step_0_and_a_checkpoint(tiny_model_path, gsm8k_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from launch.stability import main
    from core.models import load_model

    # A checkpoint's learner/ folder: a PEFT adapter with non-zero B, as training leaves it.
    peft = get_peft_model(load_model(tiny_model_path, "float32"),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"], init_lora_weights=False))
    adapter = tmp_path / "checkpoints" / "step-000002" / "learner"
    peft.save_pretrained(adapter)
    rc = main(["--model", tiny_model_path, "--data", str(gsm8k_dir), "--sets", "2", "--probe-samples", "3",
               "--max-tokens", "96", "--rank", "4", "--checkpoints", str(adapter), "--out", str(tmp_path / "out")])
    assert rc == 0
    out = json.loads((tmp_path / "out" / "stability.json").read_text())
    assert list(out["policies"]) == ["step 0 (base)", "step-000002"]
    for p in out["policies"].values():
        assert len(p["sets"]) == 2 and p["down_proj"]["of"] == 2 and p["sets"][0]["probe_samples"] == 3
        assert all(s["down_proj"].endswith("down_proj") for s in p["sets"])
    base, merged = (out["policies"][k]["sets"][0]["global_share"] for k in out["policies"])
    assert base != merged  # the merged adapter changed the policy that was probed
    assert "top down_proj (DomLoRA)" in (tmp_path / "out" / "stability.md").read_text()
