"""The GRPO probe: one rollout and reward pass of the policy (the hf engine on the tiny Llama),
group advantages as the run computes them, and probe gradients equal to autograd's gradient
of the policy-gradient loss on those samples; make_plan reaches it through probe_source."""
from __future__ import annotations

import pytest
import torch

from placement.probe import batch_gradients, build_probe
from rl.config import load_config
from rl.grpo import group_advantages

CHARS_REWARD = "reward.functions=[{name: length_penalty, kwargs: {max_len: 1000, unit: chars}}]"


def _cfg(tiny_model_path, *extra):
    return load_config("launch/configs/tiny.yaml", [f"model.name={tiny_model_path}", "rollout.group_size=4",
                                                     "rollout.max_new_tokens=12", CHARS_REWARD,
                                                     "placement.probe_samples=3", *extra])


@pytest.fixture(scope="module")
def train_rows(tiny_model_path):
    from rl.data import attach_prompts, load_task
    from core.models import load_tokenizer

    cfg = _cfg(tiny_model_path)
    return attach_prompts(load_task(cfg.data, "train"), load_tokenizer(tiny_model_path), cfg.data)


@pytest.fixture(scope="module")
def probe_rows(tiny_model_path, train_rows):
    from rl.placement_probe import grpo_probe_rows

    return grpo_probe_rows(_cfg(tiny_model_path), tiny_model_path, train_rows[:3])


def test_probe_rows_carry_the_runs_advantages(probe_rows):
    rows, summary = probe_rows
    assert summary["prompts"] == 3 and summary["group_size"] == 4 and summary["engine"] == "hf"
    assert summary["groups_with_signal"] == len(rows) == 3 - summary["flat_groups"] and rows
    for r in rows:
        assert len(r["completions"]) == len(r["completion_ids"]) == len(r["rewards"]) == 4
        # length_penalty in chars: -len(text) / 1000
        assert r["rewards"] == pytest.approx([-len(t) / 1000 for t in r["completions"]])
        expect = group_advantages(torch.tensor(r["rewards"], dtype=torch.float64), 4)
        assert r["advantages"] == pytest.approx(expect.tolist())


def test_grpo_probe_gradient_is_the_policy_gradient(probe_rows, tiny_model_path):
    from core.models import load_model, load_tokenizer

    rows, _ = probe_rows
    model = load_model(tiny_model_path, "float32")
    name = "model.layers.1.mlp.down_proj"
    probe = build_probe(load_tokenizer(tiny_model_path), rows, "grpo", max_tokens=512)
    got = batch_gradients(model, probe, [name])[name]
    # The loss written out: -(1/G) sum_i A_i mean_t log p(completion token t), summed over groups.
    loss = 0.0
    for r in rows:
        for ids, a in zip(r["completion_ids"], r["advantages"]):
            seq = torch.tensor([r["prompt_ids"] + list(ids)])
            logp = torch.log_softmax(model(input_ids=seq).logits[0, :-1].float(), -1)
            tok_lp = logp[torch.arange(seq.shape[1] - 1), seq[0, 1:]][len(r["prompt_ids"]) - 1:]
            loss = loss - a / len(r["advantages"]) * tok_lp.mean()
    model.zero_grad()
    loss.backward()
    want = dict(model.named_modules())[name].weight.grad
    assert got.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6 * float(want.abs().max()))


def test_make_plan_uses_the_scorers_regime(tiny_model_path, train_rows):
    from rl.startup import make_plan

    bmask, _ = make_plan(_cfg(tiny_model_path, "placement.scorer=bmask", "placement.budget=fraction=0.02",
                              "placement.probe_steps=2"), tiny_model_path, train_rows)
    assert bmask.details["probe_source"] == "grpo" and bmask.details["probe_rollout"]["group_size"] == 4
    page, _ = make_plan(_cfg(tiny_model_path, "placement.scorer=page"), tiny_model_path, train_rows)
    assert page.details["probe_source"] == "sft" and "probe_rollout" not in page.details
    forced, _ = make_plan(_cfg(tiny_model_path, "placement.scorer=gradrank", "placement.probe_source=sft",
                               "placement.budget=rank=40", "placement.probe_steps=2"), tiny_model_path, train_rows)
    assert forced.details["probe_source"] == "sft"


def test_flat_groups_give_a_clear_error(tiny_model_path, train_rows):
    from rl.placement_probe import grpo_probe_rows

    cfg = _cfg(tiny_model_path, "reward.functions=[{name: gsm8k_flexible}]")  # a random model scores 0
    with pytest.raises(ValueError, match="equal rewards.*placement.probe_source=sft"):
        grpo_probe_rows(cfg, tiny_model_path, train_rows[:2])


def test_score_command_scores_on_a_grpo_probe(tiny_model_path, gsm8k_dir, tmp_path):
    import json

    from launch.score import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("rollout: {group_size: 4, max_new_tokens: 12}\n"
                      "reward: {functions: [{name: length_penalty, kwargs: {max_len: 1000, unit: chars}}]}\n")
    assert main(["--model", tiny_model_path, "--data", str(gsm8k_dir), "--probe-samples", "4", "--rank", "4",
                 "--scorer", "gradrank", "--budget", "rank=40", "--steps", "2", "--config", str(recipe),
                 "--out", str(tmp_path / "out")]) == 0
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["details"]["probe_source"] == "grpo" and plan["details"]["probe_rollout"]["group_size"] == 4
    assert "policy-gradient loss on 4 sampled completions" in (tmp_path / "out" / "gradrank.md").read_text()
