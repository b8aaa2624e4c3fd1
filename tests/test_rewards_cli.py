"""`placerl reward`: scores a file of completions and lists strict/flexible GSM8K disagreements."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.reward import main, parse_fn

DATA = Path(__file__).parent / "data" / "reward_completions.jsonl"


def test_parse_fn():
    assert parse_fn("gsm8k_flexible") == {"name": "gsm8k_flexible", "weight": 1.0}
    assert parse_fn("length_penalty,weight=0.1,unit=chars,max_len=200") == {
        "name": "length_penalty", "weight": 0.1, "kwargs": {"unit": "chars", "max_len": 200}}
    with pytest.raises(ValueError, match="'oops' is not KEY=VALUE"):
        parse_fn("format_hash,oops")


def test_cli_scores_file_and_lists_disagreements(tmp_path, capsys):
    out = tmp_path / "scores.jsonl"
    rc = main(["--data", str(DATA), "--fn", "gsm8k_strict", "--fn", "gsm8k_flexible",
               "--fn", "length_penalty,weight=0.01,unit=chars,max_len=200", "--out", str(out), "--show", "3"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "scored 12 completions with 3 functions" in text
    assert "strict and flexible GSM8K grading disagree on 5 of 12 rows" in text
    assert "read '\\\\boxed{18}'" in text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12 and rows[0]["gsm8k_strict"] == 1.0 and rows[1]["gsm8k_strict"] == 0.0
    assert rows[0]["total"] == pytest.approx(2.0 + 0.01 * rows[0]["length_penalty"])


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    assert main(["--data", str(DATA), "--fn", "gsm8k_strikt"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "close names: gsm8k_strict" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p"}\n')
    assert main(["--data", str(bad)]) == 2
    assert "row 1 has no 'completion' field" in capsys.readouterr().err
