"""PlacementPlan, budgets, the PEFT round trip for every scorer, B masks under AdamW, the
scorer registry (with a real entry point), plan_from_config, and TRL's GRPOTrainer
building from plan.to_peft_config()."""
from __future__ import annotations

import json
import math
import sys
import textwrap

import pytest
import torch

from placement import (AdapterSpec, Budget, PlacementPlan, ScorerSettings, apply_plan, available_scorers,
                       build_probe, check_peft_config, get_scorer, mask_b_gradients, plan_from_config,
                       score_model, verify_adapters)
from placement.budget import allocate_ranks
from placement.modules import candidate_modules
from placement.scorers import _REGISTRY

BUDGETS = {"uniform": "", "random": "", "page": "", "page_topk": "", "plop": "", "gradrank": "rank=100",
           "gradrank_shuffled": "rank=100", "bmask": "fraction=0.02", "bmask_random": "params=300"}


@pytest.fixture(scope="module")
def tok(tiny_model_path):
    from core.models import load_tokenizer

    return load_tokenizer(tiny_model_path)


def _model(path):
    from core.models import load_model

    return load_model(path, "float32")


@pytest.fixture(scope="module")
def rows(tok, gsm8k_dir):
    out = []
    for line in (gsm8k_dir / "train.jsonl").read_text().splitlines()[:4]:
        r = json.loads(line)
        out.append({"prompt": tok.apply_chat_template([{"role": "user", "content": r["question"]}],
                                                      tokenize=False, add_generation_prompt=True),
                    "answer": r["answer"]})
    return out


@pytest.fixture(scope="module")
def plans(tiny_model_path, tok, rows):
    """One plan per registered builtin scorer, scored once for the whole module."""
    model = _model(tiny_model_path)
    probe = build_probe(tok, rows, "sft", max_tokens=128)
    settings = ScorerSettings(rank=4, alpha=8.0, top_k=2, options={"steps": 2})
    return {name: score_model(name, model, probe, Budget.parse(b), settings) for name, b in BUDGETS.items()}


# ----------------------------------------------------------------------------- budgets

def test_budget_parsing_and_errors():
    assert Budget.parse("") == Budget("uniform", 1.0)
    assert Budget.parse("rank=64") == Budget("rank", 64.0) and str(Budget.parse("rank=64")) == "rank=64"
    assert str(Budget.parse("fraction=0.25")) == "fraction=0.25"
    for bad in ["rank", "rank=-3", "params=1.5", "fraction=abc", "tokens=5"]:
        with pytest.raises(ValueError, match="placement.budget"):
            Budget.parse(bad)


def test_allocate_ranks_is_proportional_and_within_limit():
    ranks = allocate_ranks([0.5, 0.3, 0.2], [10, 10, 10], limit=240)
    assert ranks == [12, 7, 5] and sum(r * 10 for r in ranks) <= 240
    tiny = allocate_ranks([0.98, 0.01, 0.01], [1, 1, 1], limit=10)
    assert min(tiny) == 1 and sum(tiny) == 10
    with pytest.raises(ValueError, match="below the minimum"):
        allocate_ranks([1, 1], [5, 5], limit=5)


# ----------------------------------------------------------------------------- plans

def test_plan_json_round_trip_keeps_masks_and_scores(tmp_path):
    mask = torch.zeros(6, 3, dtype=torch.bool)
    mask[1, 2] = mask[5, 0] = True
    plan = PlacementPlan([AdapterSpec("model.layers.0.mlp.down_proj", 3, 6.0, mask=mask, shape=(6, 10)),
                          AdapterSpec("model.layers.1.self_attn.v_proj", 5, 10.0, shape=(4, 8))],
                         scorer="x", budget="params=42", alpha_policy="proportional", seed=7,
                         scores={"a": 1.5}, details={"k": [1, 2]}, seconds=0.25, baseline_params=99)
    back = PlacementPlan.load(plan.save(tmp_path / "p" / "plan.json"))
    assert back.to_dict() == plan.to_dict()
    assert torch.equal(back.adapters[0].mask, mask) and back.adapters[1].mask is None
    assert back.trainable_parameters() == 2 + 5 * (4 + 8) and back.max_rank() == 5
    assert list(back.b_masks()) == ["base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight"]


def test_peft_config_uses_exact_escaped_names():
    plan = PlacementPlan([AdapterSpec("model.layers.1.mlp.down_proj", 8, 16.0),
                          AdapterSpec("model.layers.11.mlp.down_proj", 8, 16.0),
                          AdapterSpec("model.layers.1.self_attn.q_proj", 2, 4.0)], scorer="x")
    cfg = plan.to_peft_config()
    assert cfg.r == 8 and cfg.lora_alpha == 16.0
    assert set(cfg.target_modules) == set(plan.module_names())
    assert cfg.rank_pattern == {r"model\.layers\.1\.self_attn\.q_proj": 2}
    assert cfg.alpha_pattern == {r"model\.layers\.1\.self_attn\.q_proj": 4.0}


@pytest.mark.parametrize("scorer", sorted(BUDGETS))
def test_every_scorer_round_trips_to_the_planned_peft_model(plans, scorer, tiny_model_path):
    plan = PlacementPlan.from_json(plans[scorer].to_json())
    assert plan.to_dict() == plans[scorer].to_dict()
    # uniform rank 4 on 2 layers x (q 256 + k 192 + v 192 + o 256 + gate 384 + up 384 + down 384)
    assert plan.scorer == scorer and plan.seconds > 0 and plan.baseline_params == 4 * 2 * 2048
    model = apply_plan(_model(tiny_model_path), plan)  # asserts every A and B shape and scale
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    masks = plan.b_masks()
    count = sum(int(masks[n].sum()) if n in masks else p.numel() for n, p in trainable.items())
    assert count == plan.trainable_parameters() == plan.trainable_parameters(model)
    lora_layers = {n for n, _ in model.named_modules() if n.endswith(".lora_A")}
    assert len(lora_layers) == len(plan.adapters)


def test_selection_scorers_spend_budgets(plans, tiny_model_path, tok, rows):
    page, topk = plans["page"], plans["page_topk"]
    top2 = sorted(topk.scores, key=topk.scores.get, reverse=True)[:2]
    assert topk.module_names() == top2  # the global top_k=2 by PAGE, any type
    downs = [n for n in page.scores if n.endswith(".down_proj")]
    assert page.module_names() == sorted(downs, key=page.scores.get, reverse=True)[:2]  # DomLoRA, top_k=2
    assert page.scores == topk.scores and page.details["dominant_module"] == page.module_names()[0]
    assert len(plans["random"].adapters) == 2 and plans["random"].module_names() != top2
    assert len(plans["uniform"].adapters) == 14 and plans["uniform"].trainable_parameters() == page.baseline_params
    plop = plans["plop"]
    assert {n.rsplit(".", 1)[1] for n in plop.module_names()} == set(plop.details["ranking"][:2])
    grad = plans["gradrank"]
    assert sum(a.rank for a in grad.adapters) <= 100 and sum(a.rank for a in grad.adapters) >= 93
    assert grad.details["alpha_policy"] == "fixed" and 0.99 < sum(grad.details["layer_importance"].values()) < 1.01
    shuffled = plans["gradrank_shuffled"]
    assert shuffled.module_names() == grad.module_names() and shuffled.scores == grad.scores
    assert sorted(a.rank for a in shuffled.adapters) == sorted(a.rank for a in grad.adapters)
    assert shuffled.details["gradrank_layer_rank"] == grad.details["layer_rank"]
    bm = plans["bmask"]
    assert sum(int(a.mask.sum()) for a in bm.adapters) == int(0.02 * bm.baseline_params)
    with pytest.raises(ValueError, match="bmask needs 'params=N' or 'fraction=F'"):
        score_model("bmask", _model(tiny_model_path), build_probe(tok, rows[:2]), Budget.parse(""), ScorerSettings())


def test_shuffled_ranks_are_a_seeded_permutation():
    from placement.scorers.gradrank import shuffled_ranks

    ranks = {l: 1 + l % 7 for l in range(30)}
    a, b, c = shuffled_ranks(ranks, 0), shuffled_ranks(ranks, 0), shuffled_ranks(ranks, 1)
    assert a == b and a != c and a != ranks
    assert sorted(a) == sorted(ranks) and sorted(a.values()) == sorted(ranks.values())


def test_domlora_takes_the_dominant_down_proj_not_the_global_top():
    from placement.modules import ModuleInfo
    from placement.scorers.page import dominant_down_projections

    cands = [ModuleInfo(f"model.layers.{l}.{t}", t.rsplit(".", 1)[1], l, 8, 8)
             for l in range(3) for t in ("self_attn.v_proj", "mlp.down_proj")]
    # As on SmolLM2: a v_proj holds the global maximum; DomLoRA still goes to a down_proj.
    scores = {"model.layers.0.self_attn.v_proj": 1.0, "model.layers.1.self_attn.v_proj": 9.0,
              "model.layers.2.self_attn.v_proj": 2.0, "model.layers.0.mlp.down_proj": 3.0,
              "model.layers.1.mlp.down_proj": 0.5, "model.layers.2.mlp.down_proj": 4.0}
    order = [m.name for m in dominant_down_projections(cands, scores)]
    assert order == ["model.layers.2.mlp.down_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match="add down_proj to placement.target_modules.*page_topk"):
        dominant_down_projections([m for m in cands if m.kind == "v_proj"], scores)


def test_page_places_one_down_proj_on_the_tiny_model(tiny_model_path, tok, rows):
    probe = build_probe(tok, rows[:2], "sft", max_tokens=96)
    settings = ScorerSettings(rank=4, alpha=8.0, target_modules=("v_proj", "down_proj"))
    model = _model(tiny_model_path)
    dom, top = (score_model(s, model, probe, Budget.parse(""), settings) for s in ("page", "page_topk"))
    best_down = max((n for n in dom.scores if n.endswith("down_proj")), key=dom.scores.get)
    assert dom.module_names() == [best_down] and top.module_names() == [max(top.scores, key=top.scores.get)]
    assert dom.details["dominant_is_global_top"] == (best_down == top.module_names()[0])
    with pytest.raises(ValueError, match="page_topk"):
        score_model("page", model, probe, Budget.parse(""), ScorerSettings(target_modules=("v_proj",)))


@pytest.mark.parametrize("policy", ["proportional", "rslora"])
def test_alpha_policy_is_recorded_and_built(tiny_model_path, policy, tok, rows):
    settings = ScorerSettings(rank=4, alpha=8.0, alpha_policy=policy, options={"steps": 2})
    plan = score_model("gradrank", _model(tiny_model_path), build_probe(tok, rows[:2], max_tokens=96),
                       Budget.parse("rank=60"), settings)
    assert plan.alpha_policy == policy and plan.details["alpha_policy"] == policy
    back = PlacementPlan.from_json(plan.to_json())
    assert back.to_peft_config().use_rslora == (policy == "rslora")
    model = apply_plan(_model(tiny_model_path), back)
    for spec in back.adapters:
        layer = dict(model.named_modules())[f"base_model.model.{spec.module_name}"]
        want = 8.0 / math.sqrt(spec.rank) if policy == "rslora" else 8.0 / 4  # proportional keeps alpha/r
        assert float(layer.scaling["default"]) == pytest.approx(want)


# ----------------------------------------------------------------------------- loud failures

def test_unmatched_names_and_pattern_keys_fail_loudly(tiny_model_path):
    from peft import LoraConfig, get_peft_model

    model = _model(tiny_model_path)
    bad = LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={r"model\.layers\.9\.self_attn\.q_proj": 2})
    with pytest.raises(ValueError) as e:
        check_peft_config(model, bad)
    assert "model\\.layers\\.9\\.self_attn\\.q_proj" in str(e.value) and "\n" not in str(e.value)
    plan = PlacementPlan([AdapterSpec("model.layers.7.mlp.down_proj", 4, 8.0)], scorer="x")
    with pytest.raises(ValueError, match="model.layers.7.mlp.down_proj"):
        apply_plan(model, plan)
    # A PEFT model whose ranks silently fell back is caught by the shape check.
    plan = PlacementPlan([AdapterSpec("model.layers.0.mlp.down_proj", 2, 8.0)], scorer="x")
    fallback = get_peft_model(_model(tiny_model_path), LoraConfig(r=4, lora_alpha=8.0,
                                                                  target_modules=plan.module_names()))
    with pytest.raises(AssertionError, match="rank 2"):
        verify_adapters(fallback, plan)


# ----------------------------------------------------------------------------- masks

def _masked_training(tiny_model_path, mask_mode: str, steps: int = 20):
    """20 AdamW steps (weight decay on) on a plan with B masks; returns (plan, model, A before)."""
    model = _model(tiny_model_path)
    cands = candidate_modules(model, ["v_proj", "down_proj"])
    gen = torch.Generator().manual_seed(0)
    specs = [AdapterSpec(m.name, 4, 8.0, mask=torch.rand(m.d_out, 4, generator=gen) < 0.3, shape=(m.d_out, m.d_in))
             for m in cands]
    plan = PlacementPlan(specs, scorer="x")
    peft_model = apply_plan(model, plan, grad_hooks=(mask_mode == "hooks"))
    a_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_A" in n}
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 1000, (2, 24), generator=gen)
    for _ in range(steps):
        loss = peft_model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        if mask_mode == "function":
            mask_b_gradients(peft_model, plan.b_masks())
        torch.nn.utils.clip_grad_norm_(peft_model.parameters(), 1.0)
        opt.step()
    return plan, peft_model, a_before


@pytest.mark.parametrize("mask_mode", ["hooks", "function"])
def test_masked_b_entries_stay_exactly_zero_through_adamw(tiny_model_path, mask_mode):
    plan, model, a_before = _masked_training(tiny_model_path, mask_mode)
    params = dict(model.named_parameters())
    for name, mask in plan.b_masks().items():
        b = params[name].detach()
        assert torch.count_nonzero(b[~mask]) == 0, name  # exact zeros, decay included
        assert torch.count_nonzero(b[mask]) == int(mask.sum()), name  # every kept entry trained
    for name, a in a_before.items():
        assert torch.equal(params[name].detach(), a) and not params[name].requires_grad


def test_without_masking_the_masked_entries_move(tiny_model_path):
    plan, model, _ = _masked_training(tiny_model_path, "none", steps=2)
    params = dict(model.named_parameters())
    assert all(torch.count_nonzero(params[n].detach()[~m]) > 0 for n, m in plan.b_masks().items())


def test_mask_b_gradients_rejects_masks_naming_no_parameter(tiny_model_path):
    with pytest.raises(ValueError, match="names no parameter"):
        mask_b_gradients(_model(tiny_model_path), {"base_model.model.nope.lora_B.default.weight": torch.ones(2, 2).bool()})


# ----------------------------------------------------------------------------- registry

def test_registry_lists_builtins_and_rejects_unknown_names():
    assert {"uniform", "random", "page", "page_topk", "plop", "bmask", "gradrank"} <= set(available_scorers())
    with pytest.raises(ValueError, match="placement.scorer='pagee' is not a known scorer"):
        get_scorer("pagee")


def test_entry_point_plugin_is_discovered(tmp_path, monkeypatch, tiny_model_path):
    pkg = tmp_path / "my_scorers"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        from placement.assemble import dense_spec, new_plan
        from placement.modules import candidate_modules

        def last_down(model, probe, budget, settings):
            cands = candidate_modules(model, ["down_proj"])
            return new_plan("last_down", [dense_spec(cands[-1], settings.rank, settings)], budget, settings, cands)
        last_down.needs_probe = False
    """))
    dist = tmp_path / "my_scorers-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-scorers\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[placerl.scorers]\nlast_down = my_scorers:last_down\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "last_down" in available_scorers()
        plan = score_model("last_down", _model(tiny_model_path), None, Budget.parse(""), ScorerSettings())
        assert plan.module_names() == ["model.layers.1.mlp.down_proj"] and plan.scorer == "last_down"
    finally:
        sys.modules.pop("my_scorers", None)
        _REGISTRY.pop("last_down", None)


# ----------------------------------------------------------------------------- config and TRL

def test_plan_from_config_scores_or_loads(tiny_model_path, rows, tmp_path):
    from rl.config import PlacementConfig

    cfg = PlacementConfig(scorer="page", rank=4, alpha=8.0, top_k=1, probe_samples=2)
    plan = plan_from_config(cfg, tiny_model_path, rows)
    assert plan.scorer == "page" and len(plan.adapters) == 1 and plan.details["probe_samples"] == 2
    cfg2 = PlacementConfig(scorer="uniform", plan=str(plan.save(tmp_path / "plan.json")))
    assert plan_from_config(cfg2, tiny_model_path, []).to_dict() == plan.to_dict()
    with pytest.raises(ValueError, match="needs probe rows"):
        plan_from_config(PlacementConfig(scorer="page"), tiny_model_path, [])


def test_trl_grpo_trainer_builds_from_plan(tiny_model_path, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    # Three ranks and alphas: rank_pattern and alpha_pattern must both get through TRL.
    plan = PlacementPlan([AdapterSpec("model.layers.0.self_attn.v_proj", 2, 4.0),
                          AdapterSpec("model.layers.1.self_attn.q_proj", 4, 16.0),
                          AdapterSpec("model.layers.1.mlp.down_proj", 6, 16.0)], scorer="hand")
    args = GRPOConfig(output_dir=str(tmp_path), use_vllm=False, per_device_train_batch_size=2,
                      num_generations=2, max_completion_length=8, report_to=[], use_cpu=True)
    trainer = GRPOTrainer(model=tiny_model_path, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                          args=args, train_dataset=Dataset.from_list([{"prompt": "1+1="}] * 4),
                          peft_config=plan.to_peft_config())
    verify_adapters(trainer.model, plan)  # shapes, scales, and no adapter anywhere else


def test_score_command_writes_plan_and_report(tiny_model_path, gsm8k_dir, tmp_path, capsys):
    from launch.score import main

    common = ["--model", tiny_model_path, "--data", str(gsm8k_dir), "--probe-samples", "2", "--max-tokens", "96",
              "--rank", "4", "--out", str(tmp_path)]
    assert main(common + ["--scorer", "page"]) == 0
    plan = PlacementPlan.load(tmp_path / "plan.json")
    md = (tmp_path / "page.md").read_text()
    assert len(plan.adapters) == 1 and plan.adapters[0].module_name in md and "% of total PAGE" in md
    assert (tmp_path / "page.png").read_bytes()[:4] == b"\x89PNG"
    assert main(common + ["--scorer", "page", "--budget", "tokens=3"]) == 2
    assert "placement.budget='tokens=3'" in capsys.readouterr().err


def test_bfloat16_probe_scores_like_float32(tiny_model_path, tok, rows):
    from placement.scoring import load_scoring_model
    from rl.config import PlacementConfig

    probe = build_probe(tok, rows, "sft", max_tokens=128)
    settings = ScorerSettings(rank=4, alpha=8.0, options={"steps": 2})
    plans = {dt: {name: score_model(name, load_scoring_model(tiny_model_path, dt), probe, Budget.parse(BUDGETS[name]),
                                    settings) for name in ("page", "plop", "gradrank", "bmask")}
             for dt in ("float32", "bfloat16")}
    for name, plan in plans["bfloat16"].items():
        assert plan.details["probe_dtype"] == "bfloat16" and plans["float32"][name].details["probe_dtype"] == "float32"
    for name in ("page", "plop", "gradrank"):  # bmask's scores count the entries it chose
        a, b = plans["float32"][name].scores, plans["bfloat16"][name].scores
        rel = sorted(abs(b[m] - a[m]) / abs(a[m]) for m in a)
        assert rel[len(rel) // 2] < 0.01 and rel[-1] < 0.05, (name, rel[len(rel) // 2], rel[-1])
    with pytest.raises(ValueError, match="placement.probe_dtype='float16'"):
        PlacementConfig(probe_dtype="float16").validate("placement")
