"""The GPU path: FSDP2 over NCCL on two GPUs, both rollout engines on CUDA, GRPO runs.

Skipped where torch sees no GPU (CI); the 2-GPU test also needs a second one. On a
GPU host: ``pytest tests/test_gpu.py -q`` (see docs/gpu.md for the environment).

Tolerances, and why:
- 1 vs 2 GPUs compares every LoRA gradient (gathered inside the learner after the
  last backward, before clipping and the optimizer), the loss and grad-norm metrics,
  and the update, over two updates. On the first one both sides start from the same
  weights: fp32 on CUDA (TF32 off, torch's default) agrees to 1e-4 relative (only GEMM
  shapes and the NCCL sum reorder fp32 additions); under FSDP2's bf16 mixed precision
  one rank accumulates its micro-batches' gradients in bf16 while two ranks each round
  one micro-batch's to bf16 and sum in fp32, so they differ by bf16 rounding (2^-8
  relative): 3e-2 per tensor. AdamW's first step is lr * g / |g| = lr * sign(g): an
  element whose gradient is within rounding of zero may take the opposite sign, so
  from then on the weights differ by such flips, and the second update's gradients
  and the final update (relative Frobenius norm) get 1e-2 in fp32 and 0.25 in bf16,
  which flips barely reach while a wrong shard or a missed reduction goes far past.
  A gradient scaled by a constant (a wrong divide factor) leaves Adam's update nearly
  alone: the gradients and the grad-norm metric catch it.
- vLLM in bfloat16 (CUDA graphs, sleep mode) after a sync vs the learner's PEFT model in
  fp32, teacher-forced on vLLM's own samples: mean within 0.05 and median within 0.03 (bf16
  weights and activations; about 0.003 was seen on an H200), while the base model without
  the adapter is off by more than twice the mean and by more than 0.02: a stale, unscaled
  or missing adapter shows.
- Engine logprobs vs a teacher-forced forward of the engine's own model: fp32 within
  2e-3 (cached vs uncached attention kernels); bf16 within 0.1 mean and 0.05 median
  (a bf16 logit of magnitude 20 carries about 0.04 of rounding). An off-by-one
  position or a stale KV cache is off by nats, far outside both.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

if torch.cuda.device_count() < 1:
    pytest.skip("no CUDA device: the GPU tests run on a GPU host", allow_module_level=True)

import sys  # noqa: E402

import ray.cloudpickle  # noqa: E402

from rl.config import config_from_dict, load_config  # noqa: E402
from rl.learner.group import LearnerGroup, TrainBatch  # noqa: E402

# Some helpers below run inside Ray actors, which cannot import this test module: ship it by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

REPO = Path(__file__).resolve().parent.parent
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]}
QUESTIONS = ["Tom has 3 apples and buys 5 more. How many apples does he have?",
             "A train travels 60 miles per hour for 2.5 hours. How far does it go?",
             "What is 17 times 23, minus 91?",
             "Sara reads 12 pages a day. How many days does she need for a 300-page book?"]


# ----------------------------------------------------------------------------- helpers

def make_batch(B: int, T: int = 48, seed: int = 0) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 2000, (B, T), generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    attn = (torch.arange(T)[None] < lengths[:, None]).long()
    resp = attn.float()
    resp[:, :8] = 0  # an 8-token prompt
    rollout_lp = torch.where(resp.bool(), -8.0 + 0.1 * torch.randn(B, T, generator=g), 0.0)
    return TrainBatch(ids, attn, resp, torch.randn(B, generator=g), rollout_lp, max_tokens=T)


def gradient_dump(folder: str):
    """A diagnostics seam that saves every LoRA gradient after each update's last backward
    (before clipping and the optimizer): gathered on every rank (a collective), rank 0 writes."""

    def attach(peft_model, cfg):
        names = [n for n, p in peft_model.named_parameters() if p.requires_grad]

        def capture(step):
            import torch.distributed as dist

            params, full = dict(peft_model.named_parameters()), {}
            for name in names:
                g = params[name].grad
                g = g.full_tensor() if hasattr(g, "full_tensor") else g
                full[name] = g.detach().float().cpu()
            if dist.get_rank() == 0:
                torch.save(full, os.path.join(folder, f"grad-{step}.pt"))
            return {}

        return [capture]

    return attach


def rank_placement(rank_self):
    """Runs inside a learner actor: where this rank computes and how it talks to the others."""
    import ray
    import torch.distributed as dist

    return {"device": str(rank_self.device), "backend": dist.get_backend(),
            "gpu_ids": [str(i) for i in ray.get_gpu_ids()]}


def run_learner(path: str, num_ranks: int, precision: str, batches: list[TrainBatch], folder: Path) -> dict:
    cfg = config_from_dict({
        "model": {"name": path}, "trainer": {"steps": 10, "seed": 0}, "rollout": {"temperature": 1.0},
        "learner": {"num_ranks": num_ranks, "micro_batch_size": 4, "lr": 1e-3, "mixed_precision": precision},
        "cluster": {"gpus_per_learner_rank": 1.0}})
    import ray

    folder.mkdir(parents=True)
    group = LearnerGroup(cfg, path, LORA, attach=gradient_dump(str(folder)))
    try:
        placement = ray.get([r.__ray_call__.remote(rank_placement) for r in group.ranks])
        init = group.lora_state()
        metrics = [group.train_step(b) for b in batches]
        grads = [torch.load(folder / f"grad-{i}.pt") for i in range(len(batches))]
        return {"placement": placement, "init": init, "metrics": metrics, "grads": grads,
                "state": group.lora_state()}
    finally:
        group.shutdown()


def relative_update_difference(a: dict, b: dict, init: dict) -> float:
    diff = math.sqrt(sum(float((a[k] - b[k]).float().square().sum()) for k in init))
    size = math.sqrt(sum(float((a[k] - init[k]).float().square().sum()) for k in init))
    return diff / size


# ----------------------------------------------------------------------------- 1 vs 2 GPUs

@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("precision,tol_first,tol_later", [("fp32", 1e-4, 1e-2), ("bf16", 3e-2, 0.25)])
def test_two_gpu_update_matches_one_gpu(ray_local, tiny_model_path, tmp_path, precision, tol_first, tol_later):
    batches = [make_batch(7, seed=2), make_batch(8, seed=1)]  # 7: uneven over two ranks (a padded row)
    one = run_learner(tiny_model_path, 1, precision, batches, tmp_path / "one")
    two = run_learner(tiny_model_path, 2, precision, batches, tmp_path / "two")

    assert [p["backend"] for p in one["placement"] + two["placement"]] == ["nccl"] * 3
    assert all(p["device"].startswith("cuda") for p in one["placement"] + two["placement"])
    gpus = [p["gpu_ids"] for p in two["placement"]]
    assert all(len(g) == 1 for g in gpus) and gpus[0] != gpus[1], f"ranks not on two GPUs: {gpus}"

    for step, (m1, m2, g1, g2) in enumerate(zip(one["metrics"], two["metrics"], one["grads"], two["grads"])):
        tol = tol_first if step == 0 else tol_later
        assert m1["skipped"] == 0 and m2["skipped"] == 0 and g1.keys() == g2.keys()
        assert any(float(g.norm()) > 0 for g in g1.values())
        worst = 0.0
        for k, g in g1.items():
            if float(g.norm()) == 0:  # lora_A before B has moved: exactly zero on both sides
                assert float(g2[k].norm()) == 0, k
                continue
            worst = max(worst, float((g2[k] - g).norm() / g.norm()))
        print(f"{precision} update {step}: gradient difference / norm, worst LoRA tensor = {worst:.2e} "
              f"(tolerance {tol:g})")
        assert worst < tol
        for k in ("grad_norm", "loss", "pg_loss"):
            assert math.isclose(m1[k], m2[k], rel_tol=tol, abs_tol=tol * 1e-3), (k, m1[k], m2[k])
        assert m1["tokens"] == m2["tokens"]
    moved = max(float((one["state"][k] - one["init"][k]).abs().max()) for k in one["init"])
    assert moved > 1e-4, "the update did not move the adapter"
    rel = relative_update_difference(one["state"], two["state"], one["init"])
    print(f"{precision}: update difference (relative Frobenius) = {rel:.2e} (tolerance {tol_later:g})")
    assert rel < tol_later


# ----------------------------------------------------------------------------- hf engine on CUDA

def teacher_forced(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + completion], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    logp = (logits / temperature).log_softmax(-1)
    return logp.gather(1, torch.tensor(completion, device=device)[:, None]).squeeze(1).cpu()


def random_adapter(model_path: str, version: int):
    from peft import LoraConfig, get_peft_model

    from core.models import load_model
    from rl.rollout.sync import make_payload

    model = get_peft_model(load_model(model_path, "float32"), LoraConfig(**LORA))
    gen = torch.Generator().manual_seed(version)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return make_payload(model, version)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_engine_on_cuda_samples_n_with_consistent_logprobs(smollm2_path, dtype):
    from rl.config import RolloutConfig
    from core.models import load_tokenizer
    from rl.rollout.engine import SamplingSpec
    from rl.rollout.hf_engine import HFEngine

    tok = load_tokenizer(smollm2_path)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=False) for q in QUESTIONS]
    ids = tok(prompts, add_special_tokens=False)["input_ids"]
    engine = HFEngine(RolloutConfig(engine="hf", max_lora_rank=16, max_model_len=1024), smollm2_path, dtype, seed=0)
    assert next(engine.model.parameters()).device.type == "cuda"
    if dtype == "float32":  # the adapter path too: LoRA weights moved to the GPU and applied
        engine.load_adapter(random_adapter(smollm2_path, 1))
        assert engine.adapter_version() == 1
        assert next(p for n, p in engine.model.named_parameters() if "lora_B" in n).device.type == "cuda"
    n, T, max_new = 4, 0.8, 40
    groups = engine.generate(ids, SamplingSpec(n=n, max_new_tokens=max_new, temperature=T, seed=123))
    assert len(groups) == len(ids) and all(len(g) == n for g in groups)
    diffs = []
    for prompt, group in zip(ids, groups):
        assert len({tuple(c.token_ids) for c in group}) > 1, "n samples of a prompt are all identical"
        for c in group:
            assert len(c.token_ids) == len(c.logprobs) >= 1 and c.finish_reason in ("stop", "length")
            assert c.finish_reason == "stop" or len(c.token_ids) == max_new
            ref = teacher_forced(engine.model, prompt, c.token_ids, T)
            diffs.append((torch.tensor(c.logprobs) - ref).abs())
    d = torch.cat(diffs)
    print(f"{dtype}: |engine - teacher-forced| logprob mean {d.mean():.2e} median {d.median():.2e} "
          f"max {d.max():.2e} over {d.numel()} tokens")
    if dtype == "float32":
        assert float(d.max()) < 2e-3
    else:
        assert float(d.mean()) < 0.1 and float(d.median()) < 0.05
    # The same seed and the same batch give the same samples (a different batch draws differently).
    again = engine.generate(ids, SamplingSpec(n=n, max_new_tokens=max_new, temperature=T, seed=123))
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in groups]
    greedy = engine.generate(ids[:2], SamplingSpec(n=3, max_new_tokens=16, temperature=0.0))
    assert all(len({tuple(c.token_ids) for c in g}) == 1 for g in greedy)


# ----------------------------------------------------------------------------- GRPO on one GPU

def engine_device(worker_self):
    engine = worker_self.engine
    if hasattr(engine, "model"):  # hf: the engine's own torch model
        return str(next(engine.model.parameters()).device)
    from vllm.platforms import current_platform  # vLLM: the platform it runs on, and sleep mode

    return f"{current_platform.device_type} sleeps={engine.sleeps}"


def run_tiny(tmp_path, steps: int, before_fit=None, engine: str = "hf", extra: list[str] = ()) -> tuple[dict, dict]:
    """The tiny recipe on one GPU (learner rank and rollout worker colocated) for ``steps``;
    ``extra``: more overrides."""
    import ray
    from ray.util.placement_group import PlacementGroup

    from rl.trainer import Trainer

    cfg = load_config(REPO / "launch" / "configs" / "tiny.yaml", [
        f"logging.output_dir={tmp_path}", "logging.run_name=gpu", "logging.progress=false",
        "logging.tensorboard=false", f"rollout.engine={engine}", f"trainer.steps={steps}", "trainer.save_every=2",
        "trainer.eval_size=4", "cluster.colocate=true", "cluster.gpus_per_learner_rank=0.5",
        "cluster.gpus_per_rollout_worker=0.4", "rollout.gpu_memory_utilization=0.25", *extra])
    groups_before = set(ray.util.placement_group_table())
    trainer = Trainer(cfg, tmp_path / "gpu")
    try:
        seen = {"learner": ray.get(trainer.learner.ranks[0].__ray_call__.remote(rank_placement)),
                "rollout": ray.get(trainer.rollout.workers[0].__ray_call__.remote(engine_device))}
        if before_fit is not None:
            seen.update(before_fit(trainer))
        return trainer.fit(), seen
    finally:
        trainer.close()
        # The run's placement group outlives the Trainer; free its GPU share for later tests.
        for pg_id in set(ray.util.placement_group_table()) - groups_before:
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_tiny_grpo_run_colocated_on_one_gpu_then_resumed(ray_local, tiny_model_path, tmp_path, engine):
    from safetensors.torch import load_file

    from rl.checkpoint import MARKER
    from rl.metrics_log import read_metrics

    _, seen = run_tiny(tmp_path, steps=2, engine=engine)
    learner, rollout = seen["learner"], seen["rollout"]
    assert learner["device"].startswith("cuda") and learner["backend"] == "nccl"
    # vLLM colocated on a GPU sleeps while the learner steps (rollout.sleep_mode: auto).
    assert rollout.startswith("cuda") if engine == "hf" else rollout == "cuda sleeps=True"
    assert learner["gpu_ids"], "the learner rank was given no GPU by Ray"
    saved = tmp_path / "gpu" / "checkpoints" / "step-000002"
    assert (saved / MARKER).exists() and (saved / "learner" / "adapter_model.safetensors").exists()

    def restored(trainer):  # the checkpoint loads onto the GPU rank exactly as it was saved
        assert trainer.resume() and trainer.step == 2
        live = {k.replace(".default", ""): v for k, v in trainer.learner.lora_state().items()}
        disk = load_file(str(saved / "learner" / "adapter_model.safetensors"))
        return {"restored_exactly": live.keys() == disk.keys() and all(torch.equal(live[k], disk[k]) for k in disk)}

    final, seen = run_tiny(tmp_path, steps=3, before_fit=restored, engine=engine)
    assert seen["restored_exactly"]
    metrics = read_metrics(tmp_path / "gpu")
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]  # step 0: the evaluation before training
    for m in metrics[1:]:
        assert math.isfinite(m["learner/loss"]) and m["learner/skipped"] == 0
        assert m["throughput/rollout_tokens_per_s"] > 0
        assert m["time/sync_s"] > 0 and m["time/wake_s"] >= 0 and m["time/sleep_s"] >= 0
    assert set(final) >= {"accuracy_strict", "accuracy_flexible"}
    assert (tmp_path / "gpu" / "checkpoints" / "step-000003" / MARKER).exists()


# ----------------------------------------------------------------------------- vLLM on CUDA

@pytest.fixture(scope="module")
def gpu_vllm(tiny_model_path):
    """vLLM as a GPU run uses it: bfloat16, CUDA graphs (enforce_eager auto), sleep mode. One
    engine for the module: a vLLM engine's GPU memory is not given back inside a process."""
    from rl.config import RolloutConfig
    from rl.rollout.vllm_engine import VLLMEngine

    cfg = RolloutConfig(engine="vllm", max_lora_rank=16, max_model_len=256, gpu_memory_utilization=0.15,
                        sleep_mode=True)
    return VLLMEngine(cfg, tiny_model_path, "bfloat16", seed=0)


def vllm_vs_learner(engine, model, prompts, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """|vLLM - learner| and |vLLM - base model| logprobs of every token vLLM sampled."""
    from test_sync import teacher_forced_logprobs

    diffs, gaps = [], []
    for prompt, row in zip(prompts, engine.generate(prompts, spec)):
        for c in row:
            got = torch.tensor(c.logprobs)
            diffs.append((got - teacher_forced_logprobs(model, prompt, c.token_ids)).abs())
            with model.disable_adapter():
                gaps.append((got - teacher_forced_logprobs(model, prompt, c.token_ids)).abs())
    return torch.cat(diffs), torch.cat(gaps)


def test_vllm_bf16_on_gpu_after_sync_matches_learner_mixed_rank_alpha(gpu_vllm, tiny_model_path):
    from test_sync import CASES, PROMPTS, learner_model

    from core.models import load_model
    from rl.rollout.sync import make_payload
    from rl.rollout.engine import SamplingSpec

    assert gpu_vllm.sleeps
    assert not gpu_vllm.llm.llm_engine.vllm_config.model_config.enforce_eager, "vLLM turned CUDA graphs off"
    model = learner_model(load_model(tiny_model_path, "float32").eval(), CASES["mixed-rank-alpha"], seed=11)
    gpu_vllm.load_adapter(make_payload(model, version=1))
    d, gap = vllm_vs_learner(gpu_vllm, model, PROMPTS, SamplingSpec(n=4, max_new_tokens=24, temperature=1.0, seed=3))
    print(f"vLLM bf16 vs fp32 PEFT: mean {d.mean():.2e} median {d.median():.2e} max {d.max():.2e} over "
          f"{d.numel()} tokens; vs the base model mean {gap.mean():.2e}")
    assert float(d.mean()) < 0.05 and float(d.median()) < 0.03
    assert float(gap.mean()) > max(2 * float(d.mean()), 0.02), "the adapter barely changes the model"


def freed_by_sleep(engine) -> int:
    """Put ``engine`` to sleep; the bytes by which the device's free memory grew."""
    torch.cuda.synchronize()
    free_awake = torch.cuda.mem_get_info()[0]
    assert engine.sleep() is True
    return torch.cuda.mem_get_info()[0] - free_awake


def test_vllm_sleep_wake_keeps_serving_the_current_adapter(gpu_vllm, tiny_model_path):
    from test_sync import CASES, PROMPTS, learner_model

    from core.models import load_model
    from rl.rollout.sync import make_payload
    from rl.rollout.engine import SamplingSpec

    model = learner_model(load_model(tiny_model_path, "float32").eval(), CASES["uniform"], seed=5)
    gpu_vllm.load_adapter(make_payload(model, version=(gpu_vllm.adapter_version() or 0) + 1))
    greedy = SamplingSpec(n=1, max_new_tokens=16, temperature=0)
    before = gpu_vllm.generate(PROMPTS, greedy)
    freed = freed_by_sleep(gpu_vllm)
    print(f"sleep freed {freed / 2**30:.2f} GiB")
    assert freed > 2**28, "sleep did not free the KV cache"
    after = gpu_vllm.generate(PROMPTS, greedy)  # wakes up first
    assert [r[0].token_ids for r in after] == [r[0].token_ids for r in before]
    for a, b in zip(after, before):
        assert max(abs(x - y) for x, y in zip(a[0].logprobs, b[0].logprobs)) < 1e-2
    # Still the adapter, not the bare base weights: the learner's model agrees, the base does not.
    d, gap = vllm_vs_learner(gpu_vllm, model, PROMPTS, SamplingSpec(n=2, max_new_tokens=16, temperature=1.0, seed=9))
    assert float(d.mean()) < 0.05 and float(gap.mean()) > max(2 * float(d.mean()), 0.02)
    # A sync while asleep wakes the engine and serves the new version.
    gpu_vllm.sleep()
    newer = learner_model(load_model(tiny_model_path, "float32").eval(), CASES["uniform"], seed=6)
    # Same structure as the served version: written into the slot in place (rl/rollout/vllm_inplace.py).
    assert gpu_vllm.load_adapter(make_payload(newer, version=gpu_vllm.adapter_version() + 1))["sync_path"] == "inplace"
    d_new, _ = vllm_vs_learner(gpu_vllm, newer, PROMPTS, SamplingSpec(n=2, max_new_tokens=16, temperature=1.0, seed=9))
    assert float(d_new.mean()) < 0.05


def test_vllm_batch_seeds_on_gpu_repeat_a_call_and_differ_across_steps(gpu_vllm):
    """rollout.seed_mode=batch, the GPU default: vLLM's GPU model runner draws each request's
    seed from numpy's global generator, so the engine reseeds numpy with torch for every call.
    Two calls of one step draw the same samples, on the same engine, one after the other."""
    import dataclasses

    from rl.rollout.engine import SamplingSpec

    assert gpu_vllm.seed_mode == "batch"
    ids = lambda out: [[c.token_ids for c in row] for row in out]  # noqa: E731
    spec = SamplingSpec(n=4, max_new_tokens=24, temperature=1.0, seed=41)
    prompts = [[1, 100, 200, 300], [1, 42, 43]]

    def call(sampling):  # the prefix cache reset: a cached prompt's KV in bf16 could tip a near tie
        gpu_vllm.wake_up()  # an earlier test may leave it asleep
        gpu_vllm.llm.reset_prefix_cache()
        return gpu_vllm.generate(prompts, sampling)

    one, two, other_step = call(spec), call(spec), call(dataclasses.replace(spec, seed=42))
    assert ids(one) == ids(two)
    assert ids(one) != ids(other_step)
    assert all(len({tuple(c.token_ids) for c in row}) == 4 for row in one), "a prompt's samples are identical"


def test_vllm_float32_on_gpu_is_refused_before_starting(tiny_model_path):
    from rl.config import RolloutConfig
    from rl.rollout.vllm_engine import VLLMEngine

    with pytest.raises(ValueError, match=r"^rollout.dtype=float32 .*set rollout.dtype=bfloat16"):
        VLLMEngine(RolloutConfig(engine="vllm", max_lora_rank=16, max_model_len=256), tiny_model_path, "float32", 0)
