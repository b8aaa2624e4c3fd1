"""Shared fixtures: the builtin models (built once, cached across runs) and a loopback Ray."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# Tests never reach a hub, and vLLM runs in-process (fast start, no leaked shm).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
GSM8K_DIR = Path(os.environ.get("PLACERL_GSM8K_DIR", REPO.parent / "shared" / "data" / "gsm8k"))
# The first 32 train and 16 test rows of GSM8K (MIT, LICENSE beside them): tests that need
# GSM8K's format but not its size run on these wherever the full dataset is absent.
GSM8K_SAMPLE = REPO / "tests" / "data" / "gsm8k"
if (GSM8K_DIR / "train.jsonl").exists():  # seen by subprocesses and Ray jobs too
    os.environ.setdefault("PLACERL_GSM8K_DIR", str(GSM8K_DIR))


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from rl.models import materialise_smollm2

    return str(materialise_smollm2())


@pytest.fixture(scope="session")
def tiny_model_path(smollm2_path) -> str:
    from rl.models import materialise_tiny_llama

    return str(materialise_tiny_llama())


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    """A folder with GSM8K's train.jsonl and test.jsonl: the full dataset, else the shipped sample."""
    return GSM8K_DIR if (GSM8K_DIR / "train.jsonl").exists() else GSM8K_SAMPLE


@pytest.fixture(scope="session")
def gsm8k_full_dir() -> Path:
    """The full dataset, for tests about its size."""
    if not (GSM8K_DIR / "train.jsonl").exists():
        pytest.skip(f"the full GSM8K is not at {GSM8K_DIR}; set PLACERL_GSM8K_DIR")
    return GSM8K_DIR


@pytest.fixture(scope="session")
def ray_local():
    """One loopback Ray for the whole session (starting Ray costs seconds)."""
    import ray

    from rl.cluster import init_ray

    init_ray(num_cpus=4, object_store_mb=512)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def numpy_ranks():
    """(effective rank, stable rank) of a matrix by numpy's SVD: the reference for rl.diagnostics.tensor_stats."""
    def ranks(m) -> tuple[float, float]:
        s = np.linalg.svd(m.double().numpy(), compute_uv=False)
        p = s / s.sum()
        p = p[p > 0]
        return float(np.exp(-(p * np.log(p)).sum())), float((s ** 2).sum() / s[0] ** 2)
    return ranks
