"""The placement comparison: Wilson intervals, correlations, rank-vs-shift fits, pooling, and `placerl compare` on the tiny model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rl.experiments import compare_report as cr

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "launch" / "configs" / "tiny.yaml"


@pytest.mark.parametrize("x,n,lo,hi", [
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score, no continuity correction).
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)])
def test_wilson_interval_matches_published_values(x, n, lo, hi):
    got = cr.wilson_interval(x, n)
    assert got == pytest.approx((lo, hi), abs=6e-5)


def test_wilson_interval_closed_forms_and_errors():
    z2 = cr.Z95 ** 2
    assert cr.wilson_interval(0, 10)[1] == pytest.approx(z2 / (10 + z2))  # upper bound at zero successes
    assert cr.wilson_interval(10, 10)[0] == pytest.approx(10 / (10 + z2))
    lo, hi = cr.wilson_interval(5, 10)
    assert lo + hi == pytest.approx(1.0)  # symmetric about 1/2
    assert all(math.isnan(v) for v in cr.wilson_interval(0, 0))
    with pytest.raises(ValueError, match="successes <= n"):
        cr.wilson_interval(11, 10)


def test_pearson_and_slope_on_known_data():
    x = [1.0, 2.0, 3.0, 4.0]
    assert cr.pearson(x, [2 * v + 1 for v in x]) == pytest.approx(1.0)
    assert cr.pearson(x, [-v for v in x]) == pytest.approx(-1.0)
    # Anscombe's first quartet: r = 0.816, slope 0.500.
    ax = [10, 8, 13, 9, 11, 14, 6, 4, 12, 7, 5]
    ay = [8.04, 6.95, 7.58, 8.81, 8.33, 9.96, 7.24, 4.26, 10.84, 4.82, 5.68]
    assert cr.pearson(ax, ay) == pytest.approx(0.81642, abs=1e-4)
    assert cr.ols_slope(ax, ay) == pytest.approx(0.50009, abs=1e-4)
    assert math.isnan(cr.pearson([3.0, 3.0, 3.0], [1.0, 2.0, 3.0]))  # equal ranks: no correlation
    assert math.isnan(cr.ols_slope([3.0, 3.0], [1.0, 2.0]))


def _plan(ranks: dict[int, int]) -> dict:
    return {"adapters": [{"module": f"model.layers.{i}.{m}", "rank": r, "alpha": 16.0}
                         for i, r in ranks.items() for m in ("mlp.down_proj", "self_attn.q_proj")]}


def test_rank_shift_fit_recovers_a_sqrt_r_law():
    ranks = {0: 2, 1: 4, 2: 8, 3: 16}
    plan = _plan(ranks)
    assert cr.layer_ranks(plan, ["down_proj"]) == {f"layers.{i}": float(r) for i, r in ranks.items()}
    g_shares = {"layers.0": 0.4, "layers.1": 0.3, "layers.2": 0.2, "layers.3": 0.1}
    # LoRA norms grow like sqrt(r) on top of G (alpha proportional to r), then renormalise.
    raw = {k: v * math.sqrt(ranks[int(k[-1])]) for k, v in g_shares.items()}
    lora_shares = {k: v / sum(raw.values()) for k, v in raw.items()}
    fit = cr.rank_shift_fit(cr.layer_ranks(plan), cr.importance_shift(lora_shares, g_shares))
    assert fit.n == 4 and fit.slope == pytest.approx(0.5) and fit.pearson == pytest.approx(1.0)
    # Fixed alpha: 1/sqrt(r).
    raw = {k: v / math.sqrt(ranks[int(k[-1])]) for k, v in g_shares.items()}
    fit = cr.rank_shift_fit(cr.layer_ranks(plan), cr.importance_shift({k: v / sum(raw.values()) for k, v in raw.items()}, g_shares))
    assert fit.slope == pytest.approx(-0.5) and fit.pearson == pytest.approx(-1.0)


def _records(g_norms: list[float], lora_norms: list[float], reward: list[float], acc=(0.25, 0.5), n=8) -> list[dict]:
    recs = [{"step": 0, "eval/accuracy_strict": 0.0, "eval/accuracy_flexible": 0.0, "eval/n": float(n)}]
    for s, r in enumerate(reward, 1):
        rec = {"step": s, "reward/mean": r, "learner/diag/G/norm_mean": 1.0, "learner/diag/lora/norm_mean": 1.0}
        for i, (g, lo) in enumerate(zip(g_norms, lora_norms)):
            rec[f"learner/diag/G/layers.{i}.mlp.down_proj/norm"] = g
            rec[f"learner/diag/lora/layers.{i}.mlp.down_proj/norm"] = lo
        recs.append(rec)
    recs[-1].update({"eval/accuracy_strict": acc[0], "eval/accuracy_flexible": acc[1], "eval/n": float(n)})
    return recs


def test_run_result_pooling_and_the_sqrt_r_verdict():
    ranks = {0: 4, 1: 8, 2: 16}
    g = [1.0, 2.0, 4.0]
    uni = cr.run_result("uniform", 0, _records(g, g, [0.0, 0.5, 1.0, 1.0]), _plan({0: 8, 1: 8, 2: 8}),
                        params=100, wall_s=10.0, module_types=["down_proj"], last=2)
    assert uni.reward_last == pytest.approx(1.0) and uni.accuracy_flexible == 0.5 and uni.eval_n == 8
    assert uni.spread_G == pytest.approx(4.0) and uni.spread_lora == pytest.approx(4.0)
    assert math.isnan(uni.fit.pearson)  # equal ranks
    prop = cr.run_result("gradrank:proportional", 0, _records(g, [v * math.sqrt(ranks[i]) for i, v in enumerate(g)],
                                                              [0.2]), _plan(ranks), params=100, wall_s=12.0)
    fixed = cr.run_result("gradrank:fixed", 0, _records(g, [v / math.sqrt(ranks[i]) for i, v in enumerate(g)], [0.1]),
                          _plan(ranks), params=100, wall_s=12.0)
    assert prop.fit.slope == pytest.approx(0.5) and fixed.fit.slope == pytest.approx(-0.5)
    assert prop.spread_lora == pytest.approx(4.0 * 2.0)  # sqrt(16/4) widens the 4x spread to 8x
    failed = cr.RunResult("uniform", 1, error="RuntimeError: boom")
    rows = cr.pool([uni, failed, prop, fixed])
    assert [r.placement for r in rows] == ["uniform", "gradrank:proportional", "gradrank:fixed"]
    assert rows[0].runs == 2 and rows[0].failed == 1 and rows[0].n == 8 and rows[0].correct_flexible == 4
    assert rows[1].amplification == pytest.approx(2.0) and rows[2].amplification == pytest.approx(0.5)
    verdict = cr.sqrt_r_verdict(rows)
    assert verdict[-1].startswith("sqrt(r) effect: SHOWS")
    swapped = cr.sqrt_r_verdict([rows[0], cr.PlacementRow("gradrank:proportional", 1, 0, slope=-0.3),
                                 cr.PlacementRow("gradrank:fixed", 1, 0, slope=0.2)])
    assert swapped[-1].startswith("sqrt(r) effect: DOES NOT SHOW")
    md = cr.markdown([uni, failed, prop, fixed], title="t", setup=["x"], plots=[])
    assert "FAILED: RuntimeError: boom" in md and "50.0% [" in md and "uniform seed 1: RuntimeError: boom" in md


def test_paired_against_the_baseline():
    base = [{"flexible": [1.0, 0.0] * 50, "strict": [0.0] * 100}] * 2
    better = [{"flexible": [1.0] * 100, "strict": [0.0] * 100}] * 3
    rows = cr.paired_against({"uniform": base, "page": better, "empty": []}, "uniform")
    assert [r["placement"] for r in rows] == ["page"] and rows[0]["seeds"] == 3
    assert rows[0]["flexible"]["difference"] == pytest.approx(0.5) and rows[0]["flexible"]["low"] > 0.35
    assert rows[0]["strict"]["difference"] == 0.0
    table = cr.paired_table(rows)
    assert "**+50.0 [" in table and "| page | 3 | 100 |" in table


def test_placement_specs_and_seeds():
    from launch import compare
    from rl.experiments import compare as runner

    assert compare.parse_placement("gradrank:proportional") == ("gradrank:proportional", "gradrank", "proportional", ())
    assert compare.parse_placement("page") == ("page", "page", "", ())
    assert compare.parse_placement("uniform+rank=1") == ("uniform+rank=1", "uniform", "", ("placement.rank=1",))
    assert compare.parse_placement("bmask+budget=fraction=0.05")[3] == ("placement.budget=fraction=0.05",)
    with pytest.raises(ValueError, match="placement key other than scorer"):
        compare.parse_placement("uniform+scorer=page")
    with pytest.raises(ValueError, match="must be key=value"):
        compare.parse_placement("uniform+rank")
    assert runner.run_name("uniform+rank=1", 2) == "uniform_rank1-s2"
    with pytest.raises(ValueError, match="alpha policy 'propotional'"):
        compare.parse_placement("gradrank:propotional")
    with pytest.raises(ValueError, match="unknown scorer 'unifrom'"):
        compare.parse_placement("unifrom")
    assert compare.parse_seeds("0, 1,2") == [0, 1, 2]
    with pytest.raises(ValueError, match="--seeds"):
        compare.parse_seeds("0,x")
    assert runner.watched_types(["down_proj", "v_proj"], ["model.layers.3.mlp.down_proj"]) == ["down_proj"]
    assert runner.watched_types(["down_proj"], ["model.layers.3.self_attn.o_proj"]) == ["o_proj"]
    assert compare.main(["--config", str(TINY), "--placements", "gradrank:sideways"]) == 2


@pytest.mark.slow
def test_compare_command_end_to_end_on_tiny(tiny_model_path, tmp_path):
    """uniform trains; a user's scorer that raises fails alone and is reported in the table."""
    from launch import compare
    from placement import register_scorer

    @register_scorer("fails_on_purpose", needs_probe=False)
    def fails_on_purpose(model, probe, budget, settings):
        raise RuntimeError("this scorer fails on purpose")

    reward = f'reward.functions=[{{name: "{REPO}/tests/data/reward_fns.py:with_bonus", weight: 1.0}}]'
    rc = compare.main(["--config", str(TINY), "--placements", "fails_on_purpose,uniform,uniform+rank=1", "--seeds",
                       "0", "--baseline", "uniform", "--steps", "2", "--out", str(tmp_path / "runs"),
                       "trainer.eval_size=4", reward, "logging.progress=false", "logging.tensorboard=false",
                       "trainer.save_every=100"])
    assert rc == 0
    results = {r["placement"]: r for r in json.loads((tmp_path / "runs" / "report" / "results.json").read_text())}
    uni, bad = results["uniform"], results["fails_on_purpose"]
    assert uni["error"] == "" and uni["eval_n"] == 4 and uni["params"] > 0 and uni["wall_s"] > 0
    assert uni["rank_min"] == uni["rank_max"] == 4 and math.isfinite(uni["reward_last"])
    assert float(uni["spread_G"]) >= 1.0 and float(uni["spread_lora"]) >= 1.0  # real per-layer norms
    assert bad["error"] == "RuntimeError: this scorer fails on purpose"
    md = (tmp_path / "runs" / "report" / "report.md").read_text()
    assert "FAILED: RuntimeError: this scorer fails on purpose" in md
    assert (tmp_path / "runs" / "report" / "compare_accuracy.png").exists()
    assert results["uniform+rank=1"]["rank_max"] == 1
    marks = json.loads((tmp_path / "runs" / "uniform-s0" / "eval_problems.json").read_text())
    assert len(marks["flexible"]) == len(marks["strict"]) == 4
    assert sum(marks["flexible"]) / 4 == pytest.approx(uni["accuracy_flexible"])
    paired = json.loads((tmp_path / "runs" / "report" / "paired.json").read_text())
    assert [p["placement"] for p in paired] == ["uniform+rank=1"] and paired[0]["flexible"]["problems"] == 4
    assert "Paired against the baseline" in md
