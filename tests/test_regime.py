"""The regime contrast: report functions on constructed metrics, and `placerl regime` end to end on the tiny model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rl.diagnostics import records as dr
from rl.experiments import regime_report as rr
from rl.experiments.regime import setup_lines

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "launch" / "configs" / "tiny.yaml"
CAP = 40  # loss tokens per step in the end-to-end run: below both regimes' 8 sequences of up to 16 tokens


def capture(step: int, kind_stats: dict[str, dict[str, float]], prefix: str = "learner/diag/") -> dict:
    """One metrics.jsonl record holding diagnostics, keyed as the trainer logs them."""
    rec = {"step": step, "time": 0.0}
    for kind, stats in kind_stats.items():
        rec.update({f"{prefix}{kind}/{k}": v for k, v in stats.items()})
    return rec


def regime(eff: float, stable: float, cos: float, sign: float, norms: tuple[float, float, float], steps: int = 3):
    """Records of one regime: per-capture statistics and per-module norms over three layers."""
    recs = []
    for s in range(1, steps + 1):
        stats = {"eff_rank_mean": eff + 0.1 * s, "stable_rank_mean": stable, "norm_mean": 1.0,
                 "importance_spread": max(norms) / min(norms), "importance_top30_share": max(norms) / sum(norms)}
        if s > 1:
            stats.update(cos_lag1_mean=cos, sign_agree_mean=sign)
        for i, n in enumerate(norms):
            stats[f"layers.{i}.mlp.down_proj/norm"] = n
        recs.append(capture(s, {"G": stats, "lora": dict(stats)}))
    return recs


SFT_LIKE_PAPERS = dict(eff=3.0, stable=1.2, cos=0.8, sign=0.9, norms=(10.0, 1.0, 1.0))
GRPO_LIKE_PAPERS = dict(eff=40.0, stable=6.0, cos=0.05, sign=0.52, norms=(2.0, 1.5, 1.0))


def by_key(contrasts, kind="G"):
    return {c.statistic.key: c for c in contrasts if c.kind == kind}


def test_contrast_that_goes_the_papers_way():
    cs = rr.regime_contrasts(regime(**SFT_LIKE_PAPERS), regime(**GRPO_LIKE_PAPERS))
    g = by_key(cs)
    assert g["eff_rank_mean"].went == "grpo" and g["eff_rank_mean"].agrees is True
    assert g["eff_rank_mean"].grpo == pytest.approx(40.2) and g["eff_rank_mean"].n_grpo == 3
    assert g["cos_lag1_mean"].went == "sft" and g["cos_lag1_mean"].agrees
    assert g["cos_lag1_mean"].n_sft == 2  # the first capture has no previous one
    assert g["importance_spread"].sft == pytest.approx(10.0) and g["importance_spread"].agrees
    assert g["eff_rank_mean"].sentence == "GRPO's G effective rank is higher than SFT's: 40.2 vs 3.20, as the papers report."
    assert rr.tally(cs) == {"agree": len(cs), "opposite": 0, "tie": 0, "inconclusive": 0, "missing": 0}
    assert {c.kind for c in cs} == {"G", "lora"}


def test_seeded_contrasts_call_a_direction_only_when_the_ci_excludes_zero():
    seeds = [(regime(**{**SFT_LIKE_PAPERS, "cos": 0.8 + 0.01 * k}, steps=6),
              regime(**{**GRPO_LIKE_PAPERS, "cos": 0.05 + 0.01 * k}, steps=6)) for k in range(3)]
    g = by_key(rr.seeded_contrasts(seeds, window=5))
    cos = g["cos_lag1_mean"]
    assert cos.went == "sft" and cos.agrees and cos.chance == 0.0 and cos.diff_ci.n == 3
    assert cos.sft_ci.estimate == pytest.approx(0.81) and cos.diff_ci.high < 0
    assert "chance level 0.000" in cos.sentence and "GRPO - SFT" in cos.sentence
    assert g["run_importance_gini"].went == "sft" and g["run_importance_top30_share"].chance == pytest.approx(1 / 3)
    # The same statistic drawn around one value in both regimes: no direction.
    same = [(regime(**{**SFT_LIKE_PAPERS, "cos": c}, steps=4), regime(**{**SFT_LIKE_PAPERS, "cos": d}, steps=4))
            for c, d in ((0.5, 0.6), (0.6, 0.5), (0.55, 0.55))]
    flat = by_key(rr.seeded_contrasts(same, window=5))["cos_lag1_mean"]
    assert flat.went == "inconclusive" and flat.agrees is None and "inconclusive" in flat.sentence
    md = rr.markdown(rr.seeded_contrasts(seeds, window=5), [s for s, _ in seeds], [g for _, g in seeds],
                     title="t", setup=[], plots=[])
    assert "GRPO - SFT [95% CI]" in md and "| 3 |" in md


def test_contrast_that_goes_the_other_way():
    cs = rr.regime_contrasts(regime(**GRPO_LIKE_PAPERS), regime(**SFT_LIKE_PAPERS))  # regimes swapped
    g = by_key(cs, "lora")
    assert g["eff_rank_mean"].went == "sft" and g["eff_rank_mean"].agrees is False
    assert "opposite to the papers' claim" in g["eff_rank_mean"].sentence
    assert g["eff_rank_mean"].sentence.startswith("SFT's LoRA gradient effective rank is higher than GRPO's: 40.2 vs 3.20")
    assert g["sign_agree_mean"].went == "grpo" and not g["sign_agree_mean"].agrees
    assert rr.tally(cs)["opposite"] == len(cs)


def test_ties_and_missing_values_state_no_direction():
    assert rr.direction(1.0, 1.01) == "tie" and rr.direction(1.0, 1.05) == "grpo"
    assert rr.direction(float("nan"), 2.0) == "missing"
    assert rr.direction(float("inf"), 3.0) == "sft"
    c = rr.make_contrast(rr.STATISTICS[0], "G", 5.0, 5.05)
    assert c.went == "tie" and c.agrees is None and "does not show" in c.sentence
    m = rr.make_contrast(rr.STATISTICS[2], "lora", float("nan"), 0.1)
    assert m.went == "missing" and "not measured under SFT" in m.sentence


def test_records_parse_prefixes_strings_and_skip_zero_captures():
    rec = {"step": 4, "learner/diag/G/eff_rank_mean": 2.5, "diag/lora/cos_lag1_mean": "nan",
           "learner/diag/G/importance_spread": "inf", "learner/loss": 1.0}
    vals = dr.diag_values(rec)
    assert vals["G/eff_rank_mean"] == 2.5 and math.isnan(vals["lora/cos_lag1_mean"])
    assert vals["G/importance_spread"] == math.inf and "loss" not in str(vals)
    zero = capture(5, {"G": {"eff_rank_mean": 0.0, "norm_mean": 0.0, "layers.0.mlp.down_proj/norm": 0.0}})
    assert dr.series([rec, zero], "G", "eff_rank_mean") == [(4, 2.5)]
    assert dr.zero_captures([rec, zero], "G") == 1 and dr.module_norms([zero], "G") == []


def test_a_resumed_run_keeps_the_last_record_of_each_step():
    recs = [{"step": 0, "eval/n": 4.0}, {"step": 1, "a": 1.0}, {"step": 2, "a": 2.0}, {"step": 2, "a": 2.5},
            {"step": 3, "a": 3.0}]
    assert [r.get("a") for r in dr.last_per_step(recs)] == [None, 1.0, 2.5, 3.0]


def test_run_importance_from_module_norms():
    # Layer 0: two modules 3 and 4 -> N = 5; layer 1: 5 -> N = 5 then 15 -> mean 10; layer 2: 1.
    recs = [capture(1, {"G": {"layers.0.mlp.down_proj/norm": 3.0, "layers.0.self_attn.v_proj/norm": 4.0,
                              "layers.1.mlp.down_proj/norm": 5.0, "layers.2.mlp.down_proj/norm": 1.0,
                              "down_proj/norm_mean": 99.0}}),
            capture(2, {"G": {"layers.0.mlp.down_proj/norm": 3.0, "layers.0.self_attn.v_proj/norm": 4.0,
                              "layers.1.mlp.down_proj/norm": 15.0, "layers.2.mlp.down_proj/norm": 1.0}})]
    assert dr.mean_layer_norms(recs, "G") == pytest.approx({"layers.0": 5.0, "layers.1": 10.0, "layers.2": 1.0})
    imp = dr.run_importance(recs, "G")
    assert imp.spread == pytest.approx(10.0) and imp.top_share == pytest.approx(10 / 16)
    assert dr.run_importance(recs, "lora") is None


def test_markdown_and_plots(tmp_path):
    from rl.experiments import plots as report_plots

    sft, grpo = regime(**SFT_LIKE_PAPERS), regime(**GRPO_LIKE_PAPERS)
    grpo.append(capture(9, {"G": {"eff_rank_mean": 0.0, "norm_mean": 0.0}}))
    cs = rr.regime_contrasts(sft, grpo)
    plots = [report_plots.regime_statistics(sft, grpo, tmp_path), report_plots.regime_importance(sft, grpo, tmp_path)]
    md = rr.markdown(cs, sft, grpo, title="t", setup=["model: x"], plots=plots)
    assert all(c.sentence in md for c in cs)
    assert "| layers.2 |" in md and "GRPO: 1 capture(s) had an exactly zero gradient" in md
    for p in plots:
        data = (tmp_path / p).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) < 200_000


def test_loss_token_cap_reaches_both_regimes_and_the_report(tmp_path):
    from rl.experiments.regime import REGIMES, RegimeOptions, per_step_sizes, regime_config, regime_overrides

    capped = RegimeOptions(config=str(TINY), loss_tokens=30)
    cfgs = {loss: regime_config(capped, loss, tmp_path, 0, sft_done=False) for loss in REGIMES}
    assert {loss: c.learner.loss_token_cap for loss, c in cfgs.items()} == {"sft": 30, "grpo": 30}
    assert cfgs["sft"].rollout.prompts_per_step == 16  # still matched in sequences (4 prompts x 4)
    # --loss-tokens wins over a cap among the user's overrides, in both regimes.
    over = RegimeOptions(config=str(TINY), loss_tokens=30, overrides=["learner.loss_token_cap=99"])
    for loss in REGIMES:
        assert regime_overrides(over, loss, tmp_path)[-1] == "learner.loss_token_cap=30"
        plain = regime_overrides(RegimeOptions(config=str(TINY)), loss, tmp_path)
        assert not any(o.startswith("learner.loss_token_cap") for o in plain)
    # The report: SFT's steps both hit the cap, GRPO's second step had fewer tokens than the cap.
    records = {"sft": [[{"learner/tokens": 30.0, "learner/capped_tokens": 50.0},
                        {"learner/tokens": 30.0, "learner/capped_tokens": 40.0}]],
               "grpo": [[{"learner/tokens": 30.0, "learner/capped_tokens": 4.0},
                         {"learner/tokens": 24.0, "learner/capped_tokens": 0.0}, {"eval/n": 8.0}]]}
    per_step = per_step_sizes(records, cfgs)
    assert per_step["sft"] | {"time_s": 0} == {"sequences": 16, "tokens": 30.0, "tokens_min": 30.0, "tokens_max": 30.0,
                                              "capped_tokens": 45.0, "steps": 2, "steps_at_cap": 2, "time_s": 0}
    assert per_step["grpo"]["steps_at_cap"] == 1 and per_step["grpo"]["tokens"] == 27.0
    lines = setup_lines(cfgs, [0], per_step, ["--loss-tokens", "30"])
    assert "SFT 16 sequences, 30 loss tokens (min 30, max 30); GRPO 16 sequences, 27 loss tokens (min 24, max 30)" \
        in "\n".join(lines)
    assert any("capped at 30 per step in both regimes" in x and "SFT 2/2, 45; GRPO 1/2, 2" in x for x in lines)
    uncapped = {loss: regime_config(RegimeOptions(config=str(TINY)), loss, tmp_path, 0, sft_done=False)
                for loss in REGIMES}
    assert not any("capped at" in x for x in setup_lines(uncapped, [0], per_step_sizes(records, uncapped), []))


@pytest.mark.slow
def test_regime_command_end_to_end_on_tiny(tiny_model_path, tmp_path):
    from launch import regime

    reward = f'reward.functions=[{{name: "{REPO}/tests/data/reward_fns.py:with_bonus", weight: 1.0}}]'
    rc = regime.main(["--config", str(TINY), "--steps", "2", "--seeds", "0,1", "--control-batches", "2",
                      "--loss-tokens", str(CAP), "--out", str(tmp_path / "runs"), "--report", str(tmp_path / "report"),
                      "trainer.eval_size=0", "logging.progress=false", "logging.tensorboard=false", "cluster.num_cpus=2",
                      "trainer.save_every=100", "rollout.prompts_per_step=2", reward])
    assert rc == 0
    out = json.loads((tmp_path / "report" / "contrasts.json").read_text())
    assert out["seeds"] == [0, 1]
    got = {(c["statistic"], c["gradient"]): c for c in out["contrasts"]}
    for kind in ("G", "lora"):
        eff = got[("eff_rank_mean", kind)]
        assert eff["captures"][0] == 4 and eff["sft_ci"]["n"] == 2 and eff["sft"] > 0
        assert eff["grpo_minus_sft_ci"]["low"] <= eff["grpo_minus_sft_ci"]["high"]
        assert eff["went"] in ("sft", "grpo", "inconclusive", "missing")
        assert got[("cos_lag1_mean", kind)]["chance"] == 0.0
        assert got[("sign_agree_mean", kind)]["chance"] == 0.5
    # Matched: SFT trains prompts_per_step x group_size = 2 x 4 gold solutions per step.
    assert out["per_step"]["sft"]["sequences"] == out["per_step"]["grpo"]["sequences"] == 8
    # Both regimes trained on at most CAP loss tokens a step, exactly CAP where they had more.
    from rl.metrics_log import read_metrics

    trained = {(seed, loss): [r for r in dr.last_per_step(read_metrics(tmp_path / "runs" / f"seed{seed}" / loss))
                              if "learner/tokens" in r] for seed in (0, 1) for loss in ("sft", "grpo")}
    for key, recs in trained.items():
        assert len(recs) == 2, key
        for r in recs:
            uncapped = r["learner/tokens"] + r["learner/capped_tokens"]
            assert r["learner/tokens"] <= CAP and r["learner/tokens"] == min(CAP, uncapped)
        assert any(r["learner/capped_tokens"] > 0 for r in recs), key  # the cap bit: the test checks something
    for seed in (0, 1):
        for sft, grpo in zip(trained[(seed, "sft")], trained[(seed, "grpo")]):
            if min(x["learner/tokens"] + x["learner/capped_tokens"] for x in (sft, grpo)) >= CAP:
                assert sft["learner/tokens"] == grpo["learner/tokens"] == CAP
    assert out["per_step"]["sft"]["tokens_max"] <= CAP and out["per_step"]["grpo"]["tokens_max"] <= CAP
    control = out["fixed_policy_control"]
    assert control["sft"]["batches"] == 2 and len(control["sft"]["cos_mean"]) == 1
    assert control["sft"]["modules"] == 14 and -1 <= control["sft"]["cos_mean"][0] <= 1
    md = (tmp_path / "report" / "report.md").read_text()
    assert "regime_statistics.png" in md and "Fixed-policy control" in md and "95% CI" in md
    assert f"capped at {CAP} per step in both regimes" in md
    for seed in (0, 1):
        run = tmp_path / "runs" / f"seed{seed}"
        sft_plan = json.loads((run / "sft" / "plan.json").read_text())
        grpo_plan = json.loads((run / "grpo" / "plan.json").read_text())
        assert sft_plan["adapters"] == grpo_plan["adapters"]  # the same placement in both regimes
        cfg = (run / "grpo" / "config.yaml").read_text()
        assert cfg.count("loss: grpo") == 1 and "down_proj" in cfg and "q_proj" in cfg
        assert f"seed: {seed}" in cfg
