"""Config loading: recipes, overrides, type coercion and one-line errors."""
import subprocess
import sys
from pathlib import Path

import pytest

from rl.config import Config, ConfigError, config_from_dict, load_config, parse_overrides

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "launch" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert isinstance(cfg, Config)


def test_overrides_are_coerced_to_field_types():
    cfg = load_config(REPO / "launch/configs/tiny.yaml",
                      ["learner.lr=1e-5", "rollout.group_size=8", "algorithm.std_normalize=false",
                       "placement.target_modules=q_proj,v_proj", "learner.betas=[0.8, 0.9]"])
    assert cfg.learner.lr == 1e-5 and isinstance(cfg.learner.lr, float)
    assert cfg.rollout.group_size == 8
    assert cfg.algorithm.std_normalize is False
    assert cfg.placement.target_modules == ["q_proj", "v_proj"]
    assert cfg.learner.betas == [0.8, 0.9]
    assert cfg.learner.loss_token_cap == 0  # off unless asked for
    assert load_config(REPO / "launch/configs/tiny.yaml", ["learner.loss_token_cap=6000"]).learner.loss_token_cap == 6000
    # the recipe's values survive where not overridden
    assert cfg.model.name == "tiny-llama"


@pytest.mark.parametrize("override, needle", [
    ("learner.lrr=1", "did you mean 'learner.lr'"),
    ("rollout.group_sise=4", "did you mean 'rollout.group_size'"),
    ("learnr.lr=1", "did you mean 'learner"),
    ("rollout.group_size=1", "rollout.group_size=1 is not allowed"),
    ("learner.lr=-1", "learner.lr=-1"),
    ("placement.rank=0", "placement.rank=0"),
    ("rollout.group_size=four", "expected an integer"),
    ("algorithm.loss_agg=sum", "choose one of token-mean"),
    ("placement.budget=half", "placement.budget"),
    ("algorithm.std_normalize=maybe", "expected true or false"),
    ("rollout.temperature=0", "must be > 0"),
    ("trainer.max_staleness=-1", "trainer.max_staleness=-1 is not allowed: must be >= 0"),
    ("algorithm.is_correction=vtrace", "choose one of none, tis, mis, icepop"),
    ("algorithm.is_correction=tis", "algorithm.tis_cap=0.0 is not allowed: is_correction=tis needs a cap >= 1"),
    ("algorithm.tis_cap=2", "set algorithm.is_correction=tis or tis_cap=0"),
    ("algorithm.icepop_high=0.9", "algorithm.icepop_low/icepop_high=[0.5, 0.9] is not allowed: a band around 1"),
    ("algorithm.mis_low=0", "algorithm.mis_low/mis_high=[0.0, 1.25]"),
    ("learner.micro_batch_tokens=-1", "learner.micro_batch_tokens=-1 is not allowed: must be >= 0"),
    ("learner.loss_token_cap=-100", "learner.loss_token_cap=-100 is not allowed: must be >= 0 (0: no cap"),
    ("learner.loss_token_cap=1.5", "learner.loss_token_cap=1.5 has the wrong type: expected an integer"),
    ("learner.profile_step=-1", "learner.profile_step=-1 is not allowed: must be >= 0 (0: off"),
    ("rollout.sleep_weights=drop", "rollout.sleep_weights='drop' is not allowed: choose one of offload, keep"),
])
def test_bad_values_fail_in_one_line(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "launch/configs/tiny.yaml", [override])
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["learner.lr"])


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "launch/configs/gsm8k_grpo.yaml", ["learner.lr=3e-5"])
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_reward_entries_are_checked():
    with pytest.raises(ConfigError, match=r"reward.functions\[0\]"):
        config_from_dict({"reward": {"functions": [{"fn": "x"}]}})


def test_cli_prints_one_line_suggestion():
    r = subprocess.run([sys.executable, "-m", "launch.train", "--config", "launch/configs/tiny.yaml", "learner.lrr=1"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert lines == ["error: unknown config key 'learner.lrr'; did you mean 'learner.lr'?"]


def test_overlap_is_refused_for_sft():
    with pytest.raises(ConfigError, match="SFT has no rollouts to overlap; set trainer.max_staleness=0"):
        load_config(REPO / "launch/configs/tiny.yaml", ["algorithm.loss=sft", "trainer.max_staleness=1"])
