"""Data: GSM8K parsing and errors, the synthetic task, prompt rendering, resumable sampling."""
import json

import pytest

from rl.config import DataConfig
from rl.data import (DataError, PromptSampler, attach_prompts, load_gsm8k, load_task, parse_gold,
                     read_gsm8k_jsonl, render_prompt, synthetic_arithmetic)


def test_parse_gold():
    assert parse_gold("so 3+4=7\n#### 7") == "7"
    assert parse_gold("#### 1,200") == "1200"
    assert parse_gold("x #### -3") == "-3"
    with pytest.raises(DataError):
        parse_gold("no marker")


def test_real_gsm8k_files(gsm8k_full_dir):
    train, test = load_gsm8k("train", str(gsm8k_full_dir)), load_gsm8k("test", str(gsm8k_full_dir))
    assert (len(train), len(test)) == (7473, 1319)
    assert all(r["gold"].lstrip("-").replace(".", "").isdigit() for r in test)


def test_shipped_copy_serves_when_the_hub_cannot(monkeypatch, caplog):
    # Offline mode: datasets fails at once (no cache here) and the shipped copy answers,
    # saying so in one line; data.path and $PLACERL_GSM8K_DIR are unset.
    monkeypatch.delenv("PLACERL_GSM8K_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level("INFO", logger="placerl"):
        rows = load_gsm8k("test")
    assert len(rows) == 1319 and rows[0]["gold"] == parse_gold(rows[0]["answer"])
    notes = [r.getMessage() for r in caplog.records if "GSM8K" in r.getMessage()]
    assert len(notes) == 1 and "copy shipped with placerl" in notes[0] and "\n" not in notes[0]


def test_unreachable_hub_is_asked_once_and_quickly(monkeypatch):
    from rl.data import hub_unreachable

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    assert hub_unreachable(timeout_s=1.0) == "127.0.0.1 is unreachable"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_unreachable() == ""  # offline mode: datasets' own cache decides


def test_path_wins_over_the_shipped_copy(monkeypatch, gsm8k_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert len(load_gsm8k("train", str(gsm8k_dir))) == 32


def test_gsm8k_from_env(monkeypatch, gsm8k_dir):
    monkeypatch.setenv("PLACERL_GSM8K_DIR", str(gsm8k_dir))
    rows = load_gsm8k("test")
    assert len(rows) == len((gsm8k_dir / "test.jsonl").read_text().splitlines()) > 0
    assert all(r["gold"].lstrip("-").replace(".", "").isdigit() for r in rows)


def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="does not exist; set data.path"):
        read_gsm8k_jsonl(tmp_path / "train.jsonl")


@pytest.mark.parametrize("line, needle", [
    ("{not json", ":2: not valid JSON"),
    (json.dumps({"question": "q"}), ":2: missing field 'answer'"),
    (json.dumps({"question": "q", "answer": "no marker"}), ":2: answer has no '#### N' line"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, needle):
    f = tmp_path / "train.jsonl"
    f.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + line + "\n")
    with pytest.raises(DataError) as e:
        read_gsm8k_jsonl(f)
    assert needle in str(e.value) and str(f) in str(e.value)


def test_synthetic_answers_are_exact_and_seeded():
    a, b, c = synthetic_arithmetic(200, 1), synthetic_arithmetic(200, 1), synthetic_arithmetic(200, 2)
    assert a == b and a != c
    for row in a:
        # replay the worked solution: every step's arithmetic holds and ends at gold
        value = None
        for step in row["answer"].splitlines()[:-1]:
            lhs, rhs = step.split("=")
            assert eval(lhs) == int(rhs)  # noqa: S307 - our own generated arithmetic
            value = int(rhs)
        assert str(value) == row["gold"] == parse_gold(row["answer"])
        assert int(row["gold"]) >= 0


@pytest.mark.parametrize("max_ops", [1, 2, 3, 4])
def test_synthetic_generation_never_fails(max_ops):
    rows = [r for seed in range(20) for r in synthetic_arithmetic(200, seed, max_ops)]
    assert all(int(r["gold"]) >= 0 for r in rows)


def test_synthetic_train_and_test_differ():
    cfg = DataConfig(task="synthetic", synthetic_size=64)
    train, test = load_task(cfg, "train"), load_task(cfg, "test")
    assert {r["question"] for r in train}.isdisjoint({r["question"] for r in test}) or len(test) < len(train)
    assert train != test


def test_prompts_use_chat_template(tiny_model_path):
    from core.models import load_tokenizer

    tok = load_tokenizer(tiny_model_path)
    text = render_prompt(tok, "What is 2+2?", "Be brief.")
    assert "<|im_start|>user" in text and text.rstrip().endswith("<|im_start|>assistant")
    assert "Be brief.\n\nWhat is 2+2?" in text
    plain = render_prompt(tok, "What is 2+2?", "", chat_template=False)
    assert plain == "What is 2+2?\n"
    rows = attach_prompts(synthetic_arithmetic(5, 0), tok, DataConfig())
    assert all(tok.decode(r["prompt_ids"]) == r["prompt"] for r in rows)
    with pytest.raises(DataError, match="max_prompt_tokens"):
        attach_prompts(synthetic_arithmetic(5, 0), tok, DataConfig(max_prompt_tokens=3))


def test_sampler_is_seeded_epochwise_and_resumable():
    s = PromptSampler(10, seed=3)
    first = s.next_indices(7) + s.next_indices(7)  # crosses an epoch boundary
    assert sorted(first[:10]) == list(range(10))  # epoch 0 is a permutation
    assert first[:10] != list(range(10))
    t = PromptSampler(10, seed=3)
    t.next_indices(7)
    saved = t.state_dict()
    u = PromptSampler(10, seed=3)
    u.load_state_dict(saved)
    assert u.next_indices(7) == first[7:]
    with pytest.raises(DataError, match="same data config"):
        PromptSampler(11, seed=3).load_state_dict(saved)


def test_val_split_is_the_tail_of_train_and_never_trained_on(gsm8k_dir):
    full = load_task(DataConfig(path=str(gsm8k_dir)), "train")
    cfg = DataConfig(path=str(gsm8k_dir), val_size=8)
    train, val, test = load_task(cfg, "train"), load_task(cfg, "val"), load_task(cfg, "test")
    assert val == full[-8:] and train == full[:-8]
    assert {r["question"] for r in train}.isdisjoint({r["question"] for r in val})
    assert test == load_task(DataConfig(path=str(gsm8k_dir)), "test")  # the test set is untouched
    assert load_task(DataConfig(path=str(gsm8k_dir)), "val") == []  # val_size=0: today's behaviour
    # A whole sampler epoch draws only train indices: no val row can reach a rollout.
    sampler = PromptSampler(len(train), seed=1)
    drawn = {train[i]["question"] for i in sampler.next_indices(len(train))}
    assert drawn == {r["question"] for r in train}


def test_val_split_rejects_sizes_that_leave_no_training(gsm8k_dir):
    n = len(load_task(DataConfig(path=str(gsm8k_dir)), "train"))
    with pytest.raises(DataError, match="data.val_size"):
        load_task(DataConfig(path=str(gsm8k_dir), val_size=n), "train")
    with pytest.raises(DataError, match="split 'dev'"):
        load_task(DataConfig(path=str(gsm8k_dir)), "dev")


def test_val_split_config_checks():
    from rl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.val_size"):
        load_config(None, ["data.val_size=-1"])
    with pytest.raises(ConfigError, match="trainer.eval_split"):
        load_config(None, ["trainer.eval_split=val"])
    assert load_config(None, ["trainer.eval_split=val", "data.val_size=5"]).trainer.eval_split == "val"
