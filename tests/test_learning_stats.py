"""The learning run's statistics: the paired interval against a bootstrap, the arm choice."""
import random

import numpy as np
import pytest

from rl.experiments.learning_stats import accuracy_with_ci, choose_arm, paired_difference, paired_records


def test_paired_difference_counts_and_interval_by_hand():
    base = [1, 1, 0, 0, 0, 1, 0, 0, 1, 0]
    arm = [1, 0, 1, 1, 0, 1, 1, 0, 1, 0]
    out = paired_difference(base, arm)
    assert (out["gained"], out["lost"], out["n"]) == (3, 1, 10)
    assert out["diff"] == pytest.approx(0.2)
    d = np.array(arm) - np.array(base)
    se = d.std(ddof=1) / np.sqrt(len(d))
    assert out["se"] == pytest.approx(se)
    assert (out["lo"], out["hi"]) == pytest.approx((0.2 - 1.959963984540054 * se, 0.2 + 1.959963984540054 * se))


def test_paired_interval_matches_a_paired_bootstrap():
    rng = random.Random(0)
    base = [int(rng.random() < 0.3) for _ in range(1319)]
    arm = [b if rng.random() < 0.8 else int(rng.random() < 0.5) for b in base]
    out = paired_difference(base, arm)
    d = np.array(arm) - np.array(base)
    gen = np.random.default_rng(1)
    means = d[gen.integers(0, len(d), size=(4000, len(d)))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    assert out["lo"] == pytest.approx(lo, abs=0.004) and out["hi"] == pytest.approx(hi, abs=0.004)
    # Pairing is what makes it narrow: the unpaired interval of the same two accuracies is wider.
    p0, p1 = np.mean(base), np.mean(arm)
    unpaired = np.sqrt(p0 * (1 - p0) / len(d) + p1 * (1 - p1) / len(d))
    assert out["se"] < unpaired


def test_paired_difference_edge_cases():
    assert paired_difference([1, 0, 1], [1, 0, 1])["hi"] == 0.0
    with pytest.raises(ValueError, match="same problems"):
        paired_difference([1], [1, 0])


def test_paired_records_match_by_index_and_gold():
    base = [{"index": 0, "gold": "3", "flexible": 1}, {"index": 1, "gold": "5", "flexible": 0}]
    arm = [{"index": 1, "gold": "5", "flexible": 1}, {"index": 0, "gold": "3", "flexible": 0}]
    assert paired_records(base, arm, "flexible") == ([1, 0], [0, 1])
    with pytest.raises(ValueError, match="gold"):
        paired_records(base, [{"index": 0, "gold": "4", "flexible": 1}, arm[0]], "flexible")
    with pytest.raises(ValueError, match="different problems"):
        paired_records(base, arm[:1], "flexible")


def test_accuracy_with_ci():
    out = accuracy_with_ci([{"f": 1}, {"f": 0}, {"f": 1}, {"f": 1}], "f")
    assert out["accuracy"] == 0.75 and out["n"] == 4 and 0 < out["ci95"][0] < 0.75 < out["ci95"][1] < 1


def test_choose_arm_uses_validation_means_then_strict_then_name():
    assert choose_arm({"a": [(0.30, 0.1), (0.40, 0.1)], "b": [(0.36, 0.2)], "c": []}) == "b"
    assert choose_arm({"a": [(0.3, 0.2)], "b": [(0.3, 0.25)]}) == "b"
    assert choose_arm({"b": [(0.3, 0.2)], "a": [(0.3, 0.2)]}) == "a"
    with pytest.raises(ValueError, match="no arm"):
        choose_arm({"a": []})


def _write_eval(folder, val, test, **extra):
    """An evaluation folder as `placerl learn` writes it: eval.json and per-problem records."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    for split, marks in (("val", val), ("test", test)):
        (folder / f"problems-{split}.jsonl").write_text("".join(
            json.dumps({"index": i, "gold": str(i), "strict": s, "flexible": f}) + "\n" for i, (s, f) in enumerate(marks)))
    (folder / "eval.json").write_text(json.dumps(extra))


def test_summary_chooses_on_val_and_reports_test_for_every_arm(tmp_path):
    import json

    from rl.experiments.learning_report import build_summary, readme

    base_test = [(0, 0)] * 6 + [(1, 1)] * 4
    _write_eval(tmp_path / "base", val=[(0, 0)] * 5, test=base_test, model="m.gguf", command="placerl learn base")
    # Arm "a": better on val, worse on test; arm "b": the reverse. The choice must follow val.
    for seed, test in ((0, [(0, 1)] * 6 + [(1, 1)] * 4), (1, [(0, 0)] * 6 + [(1, 1)] * 4)):
        _write_eval(tmp_path / "arms" / "a" / f"seed-{seed}", val=[(1, 1)] * 4 + [(0, 0)], test=test,
                    seed=seed, steps=150, overrides=["learner.lr=1e-4"])
        (tmp_path / "arms" / "a" / f"seed-{seed}" / "arm.json").write_text(json.dumps({"command": f"arm a {seed}"}))
    _write_eval(tmp_path / "arms" / "b" / "seed-0", val=[(1, 1)] + [(0, 0)] * 4, test=[(1, 1)] * 10,
                seed=0, steps=150, overrides=["learner.lr=3e-4"])
    (tmp_path / "arms" / "c" / "seed-0").mkdir(parents=True)  # started, not evaluated yet

    s = build_summary(tmp_path, "placerl learn summary")
    assert (s["model"], s["n_test"], s["n_val"], s["steps"]) == ("m.gguf", 10, 5, 150)
    assert (s["base"]["flexible"], s["base"]["strict"], s["base"]["val_flexible"]) == (0.4, 0.4, 0.0)
    a, b = s["arms"]["a"], s["arms"]["b"]
    assert a["seeds"] == [0, 1] and a["flexible"] == [1.0, 0.4] and a["strict"] == [0.4, 0.4]
    assert a["val_flexible"] == [0.8, 0.8] and b["flexible"] == [1.0] and b["val_flexible"] == [0.2]
    assert s["selection"]["chosen"] == "a" and s["incomplete"] == ["c/seed-0"]
    assert a["paired_vs_base_flexible"][0]["gained"] == 6 and a["paired_vs_base_flexible"][1]["diff"] == 0.0
    assert a["paired_vs_base_pooled"]["flexible"]["diff"] == pytest.approx(0.3) and a["paired_vs_base_pooled"]["flexible"]["seeds"] == 2
    text = readme(s, None)
    assert "| a (chosen) | 0 | 150 |" in text and "| b | 0 | 150 |" in text and "`arm a 1`" in text
    json.dumps(s)  # machine-readable as it stands


def test_summary_needs_the_base_evaluation(tmp_path):
    from rl.experiments.learning_report import build_summary

    with pytest.raises(FileNotFoundError, match="learn base"):
        build_summary(tmp_path, "x")


def test_summary_compares_arms_with_a_reference_at_equal_steps_only(tmp_path):
    from rl.experiments.learning_report import build_summary, readme

    _write_eval(tmp_path / "base", val=[(0, 0)] * 4, test=[(0, 0)] * 10, model="m")
    ref_runs = {0: [(0, 1)] * 5 + [(0, 0)] * 5, 1: [(0, 1)] * 3 + [(0, 0)] * 7}
    for seed, test in ref_runs.items():
        _write_eval(tmp_path / "arms" / "uniform" / f"seed-{seed}", val=[(0, 0)] * 4, test=test, seed=seed, steps=50)
    # "x" gains problems 5 and 6 on seed 0 and loses nothing; on seed 1 equals the reference.
    _write_eval(tmp_path / "arms" / "x" / "seed-0", val=[(0, 0)] * 4, test=[(0, 1)] * 7 + [(0, 0)] * 3, seed=0, steps=50)
    _write_eval(tmp_path / "arms" / "x" / "seed-1", val=[(0, 0)] * 4, test=ref_runs[1], seed=1, steps=50)
    _write_eval(tmp_path / "arms" / "longer" / "seed-0", val=[(0, 0)] * 4, test=[(0, 1)] * 10, seed=0, steps=150)

    s = build_summary(tmp_path, "x", reference="uniform")
    c = s["arms"]["x"]["paired_vs_uniform"]
    assert c["per_seed"]["0"]["flexible"]["gained"] == 2 and c["per_seed"]["0"]["flexible"]["diff"] == pytest.approx(0.2)
    assert c["per_seed"]["1"]["flexible"]["diff"] == 0.0
    pooled = c["pooled"]["flexible"]
    assert pooled["diff"] == pytest.approx(0.1) and pooled["lo"] <= 0.1 <= pooled["hi"] and pooled["seeds"] == 2
    assert "paired_vs_uniform" not in s["arms"]["longer"]  # 150 steps against 50: not a placement contrast
    assert "paired_vs_uniform" not in s["arms"]["uniform"]
    assert "| x | s0 +20.0" in readme(s, None)
    with pytest.raises(ValueError, match="--reference 'nope'"):
        build_summary(tmp_path, "x", reference="nope")


def test_moving_mean_averages_the_window_before_each_step():
    from rl.experiments.learning_report import moving_mean

    assert moving_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_mean([2.0, 4.0], 5) == [2.0, 3.0]
    assert moving_mean([], 3) == []
