"""Data that ships inside the package, so that a machine without a dataset hub still runs.

``gsm8k/`` holds GSM8K (OpenAI, MIT licence, ``LICENSE`` beside it) exactly as released:
train 7,473 and test 1,319 rows of jsonl, xz-compressed (1.2 MB instead of 4.9 MB).
"""
from __future__ import annotations

from pathlib import Path

GSM8K = Path(__file__).resolve().parent / "gsm8k"


def gsm8k_file(split: str) -> Path:
    """The shipped copy of GSM8K's ``split`` ('train' or 'test')."""
    return GSM8K / f"{split}.jsonl.xz"
