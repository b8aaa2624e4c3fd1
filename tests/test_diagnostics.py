"""Gradient diagnostics on real models: G from hooks against autograd, cross-step metrics,
the TRL callback, and the learner's seam (FSDP2, 2 ranks against 1)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rl.diagnostics import tensor_stats
from core.lora import DEFAULT_TARGET_MODULES
from rl.config import ConfigError, DiagnosticsConfig
from rl.diagnostics.capture import GradientDiagnostics


# ----------------------------------------------------------------------------- hooks on a real model

@pytest.fixture(scope="module")
def lora_model(tiny_model_path):
    from peft import LoraConfig, get_peft_model

    from core.models import load_model

    torch.manual_seed(0)
    model = load_model(tiny_model_path, "float32")
    # init_lora_weights=False gives B != 0, so dL/dA != 0 and both factors are exercised
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(DEFAULT_TARGET_MODULES), init_lora_weights=False)
    return get_peft_model(model, cfg)


def _batches(vocab: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 12), generator=g) for _ in range(n)]


def _loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def _cfg(**kw) -> DiagnosticsConfig:
    base = dict(enabled=True, every=1, modules=["down_proj", "v_proj"], lags=2, window=3, max_rank_dim=64)
    base.update(kw)
    return DiagnosticsConfig(**base)


def test_G_from_hooks_equals_the_autograd_weight_gradient(lora_model, numpy_ranks):
    model = lora_model
    batches = _batches(model.config.vocab_size, 2)
    diag = GradientDiagnostics(model, _cfg())
    try:
        model.zero_grad()
        assert diag.begin_step(0)
        for ids in batches:  # two micro-batches, accumulated as a trainer would
            (_loss(model, ids) / len(batches)).backward()
        diag.after_backward(0)
        lora_grads = {n: torch.cat([m.lora_A["default"].weight.grad.reshape(-1),
                                    m.lora_B["default"].weight.grad.reshape(-1)])
                      for n, m in diag.modules.items()}
        metrics = diag.end_step(0)
        got = {n: g.clone() for n, g in diag.captured_G().items()}
    finally:
        diag.close()
    assert set(got) == {f"layers.{i}.{p}" for i in (0, 1) for p in ("mlp.down_proj", "self_attn.v_proj")}

    # Reference: make the frozen weights trainable and let autograd compute their gradient.
    weights = {n: m.base_layer.weight for n, m in diag.modules.items()}
    model.zero_grad()
    for w in weights.values():
        w.requires_grad_(True)
    try:
        for ids in batches:
            (_loss(model, ids) / len(batches)).backward()
        for n, w in weights.items():
            torch.testing.assert_close(got[n], w.grad, rtol=1e-4, atol=1e-6)
            eff, stable = numpy_ranks(w.grad)
            assert metrics[f"diag/G/{n}/eff_rank"] == pytest.approx(eff, rel=1e-4)
            assert metrics[f"diag/G/{n}/stable_rank"] == pytest.approx(stable, rel=1e-4)
            assert metrics[f"diag/G/{n}/norm"] == pytest.approx(float(w.grad.norm()), rel=1e-4)
            assert metrics[f"diag/lora/{n}/norm"] == pytest.approx(float(lora_grads[n].norm()), rel=1e-5)
    finally:
        for w in weights.values():
            w.requires_grad_(False)
            w.grad = None
        model.zero_grad()
    # G of a 2 x 12-token batch has rank <= 24 in each accumulated micro-batch: 48 at most
    assert all(metrics[f"diag/G/{n}/eff_rank"] <= 48 for n in got)
    norms = {f"layers.{i}": math.hypot(metrics[f"diag/G/layers.{i}.mlp.down_proj/norm"],
                                       metrics[f"diag/G/layers.{i}.self_attn.v_proj/norm"]) for i in (0, 1)}
    imp = tensor_stats.importance(norms)
    assert metrics["diag/G/importance_spread"] == pytest.approx(imp.spread)
    assert metrics["diag/G/layers.1/importance"] == pytest.approx(imp.shares["layers.1"])


def test_cross_step_metrics_on_a_real_model_and_no_hooks_between_captures(lora_model):
    """Same batch every capture, the loss sign flipped at capture 1: G flips sign exactly."""
    model = lora_model
    (ids,) = _batches(model.config.vocab_size, 1, seed=5)
    diag = GradientDiagnostics(model, _cfg(every=2, window=3))
    base_layers = [m.base_layer for m in diag.modules.values()]
    out = {}
    try:
        for step in range(6):
            captures = diag.begin_step(step)
            assert captures == (step % 2 == 0)
            assert all(bool(b._forward_hooks) == captures for b in base_layers)
            model.zero_grad()
            sign = -1.0 if step == 2 else 1.0
            (sign * _loss(model, ids)).backward()
            diag.after_backward(step)
            out[step] = diag.end_step(step)
            assert not any(b._forward_hooks for b in base_layers)
        summary = diag.summary()
    finally:
        diag.close()
        model.zero_grad()
    assert out[1] == {} and out[3] == {}
    assert "diag/G/cos_lag1_mean" not in out[0]
    for kind in ("G", "lora"):
        assert out[2][f"diag/{kind}/cos_lag1_mean"] == pytest.approx(-1.0, abs=1e-5)
        assert out[2][f"diag/{kind}/sign_agree_mean"] == pytest.approx(0.0, abs=1e-3)
        assert out[4][f"diag/{kind}/cos_lag1_mean"] == pytest.approx(-1.0, abs=1e-5)
        assert out[4][f"diag/{kind}/cos_lag2_mean"] == pytest.approx(1.0, abs=1e-5)
        # window (+G, -G, +G): |1 - 1 + 1| / 3 on every nonzero entry
        assert out[4][f"diag/{kind}/sign_consistency_mean"] == pytest.approx(1 / 3, abs=2e-3)
    assert summary["captures"] == [0, 2, 4]
    assert summary["metrics"]["diag/G/eff_rank_mean"]["n"] == 3
    assert summary["importance_run"]["G"]["spread"] >= 1.0


def test_background_statistics_match_the_in_place_ones(lora_model):
    """The CPU worker path (the default on accelerators) gives the same series, later."""
    model = lora_model
    batches = _batches(model.config.vocab_size, 3, seed=7)
    series = {}
    for background in (False, True):
        diag = GradientDiagnostics(model, _cfg(every=1, lags=1, window=2, modules=["v_proj"]), background=background)
        returned = []
        try:
            for step, ids in enumerate(batches):
                diag.begin_step(step)
                model.zero_grad()
                _loss(model, ids).backward()
                diag.after_backward(step)
                returned.append(diag.end_step(step))
            returned.append(diag.flush())
            series[background] = dict(diag.series)
        finally:
            diag.close()
            model.zero_grad()
        delivered = [int(m["diag/step"]) for m in returned if m]
        assert delivered == [0, 1, 2]
        if background:  # step s's metrics come back from a later call, never from end_step(s)
            assert all(not m or m["diag/step"] < i for i, m in enumerate(returned))
    assert series[True].keys() == series[False].keys()
    for k, pts in series[False].items():
        np.testing.assert_allclose([v for _, v in series[True][k]], [v for _, v in pts], rtol=1e-6, err_msg=k)


def test_module_pattern_matching_nothing_fails_in_one_line(lora_model):
    with pytest.raises(ConfigError) as err:
        GradientDiagnostics(lora_model, _cfg(modules=["down_proj", "dense_4h_to_h"]))
    msg = str(err.value)
    assert "\n" not in msg
    assert "diagnostics.modules entry 'dense_4h_to_h' matches no LoRA layer" in msg
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in msg


def test_disabled_diagnostics_never_capture(lora_model):
    diag = GradientDiagnostics(lora_model, DiagnosticsConfig(enabled=False, modules=["no_such"]))
    assert diag.begin_step(0) is False and diag.end_step(0) == {}


# ----------------------------------------------------------------------------- TRL

def test_callback_inside_a_trl_grpo_step(tiny_model_path, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from rl.diagnostics.trl_callback import SUMMARY_FILE, GradientDiagnosticsCallback
    from core.models import load_model, load_tokenizer

    def length_reward(prompts, completions, **kwargs):
        return [float(len(c)) / 10.0 for c in completions]

    data = Dataset.from_dict({"prompt": [f"Count to {i}:" for i in range(4)]})
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=8, max_steps=2, logging_steps=1, learning_rate=1e-3,
                      use_vllm=False, report_to=[], save_strategy="no", use_cpu=True, seed=0)
    cb = GradientDiagnosticsCallback(_cfg(every=1, lags=1, window=2))
    trainer = GRPOTrainer(model=load_model(tiny_model_path), reward_funcs=length_reward, args=args,
                          train_dataset=data, processing_class=load_tokenizer(tiny_model_path),
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=list(DEFAULT_TARGET_MODULES)),
                          callbacks=[cb])
    cb.trainer = trainer
    trainer.train()

    logged = [h for h in trainer.state.log_history if "diag/G/eff_rank_mean" in h]
    assert len(logged) == 2, trainer.state.log_history
    assert logged[0]["diag/G/eff_rank_mean"] > 1.0
    assert "diag/G/cos_lag1_mean" in logged[1] and "diag/lora/sign_agree_mean" in logged[1]
    assert math.isfinite(logged[1]["diag/G/cos_lag1_mean"])
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert summary["captures"] == [0, 1]
    assert "layers.1.mlp.down_proj" in summary["modules"]


# ----------------------------------------------------------------------------- the learner's seam

def _reference_G(model, modules, ids) -> dict[str, torch.Tensor]:
    weights = {n: m.base_layer.weight for n, m in modules.items()}
    model.zero_grad()
    for w in weights.values():
        w.requires_grad_(True)
    try:
        _loss(model, ids).backward()
        return {n: w.grad.clone() for n, w in weights.items()}
    finally:
        for w in weights.values():
            w.requires_grad_(False)
            w.grad = None
        model.zero_grad()


def test_learner_seam_captures_only_the_first_update_of_capture_steps(lora_model, tiny_model_path):
    from rl.config import config_from_dict
    from rl.diagnostics.capture import attach_to_learner

    model = lora_model
    cfg = config_from_dict({"model": {"name": tiny_model_path}, "learner": {"updates_per_batch": 2},
                            "diagnostics": {"enabled": True, "every": 2, "modules": ["v_proj"]}})
    (fn,) = attach_to_learner(model, cfg)
    batches = _batches(model.config.vocab_size, 6, seed=11)
    got = {}
    try:
        for step in range(3):  # the learner's loop: updates, each ending with the seam call
            for u in range(2):
                model.zero_grad()
                _loss(model, batches[2 * step + u]).backward()
                metrics = fn(step)
                if u == 0 and metrics:
                    got[step] = {n: g.clone() for n, g in fn.diag.captured_G().items()}
                else:
                    assert metrics == {}
    finally:
        fn.diag.close()
        model.zero_grad()
    assert sorted(got) == [0, 2]
    for step in (0, 2):
        ref = _reference_G(model, fn.diag.modules, batches[2 * step])
        for n in ref:
            torch.testing.assert_close(got[step][n], ref[n], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_fsdp2_learner_two_ranks_match_one_rank(ray_local, tiny_model_path):
    """Real FSDP2 over gloo: G all-reduced over 2 ranks and DTensor LoRA gradients gathered
    give the same diagnostics as 1 rank on the whole batch."""
    from rl.config import config_from_dict
    from rl.diagnostics.capture import attach_to_learner
    from rl.learner.group import LearnerGroup, TrainBatch

    g = torch.Generator().manual_seed(4)
    B, T = 6, 16
    ids = torch.randint(0, 2000, (B, T), generator=g)
    attn = torch.ones(B, T, dtype=torch.long)
    resp = attn.float()
    resp[:, :4] = 0
    lp = torch.where(resp.bool(), -8.0 + 0.1 * torch.randn(B, T, generator=g), 0.0)
    batch = TrainBatch(ids, attn, resp, torch.randn(B, generator=g), lp, max_tokens=T)
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    out = {}
    for ranks in (1, 2):
        cfg = config_from_dict({"model": {"name": tiny_model_path}, "trainer": {"seed": 0},
                                "learner": {"num_ranks": ranks, "micro_batch_size": 2, "lr": 1e-2},
                                "diagnostics": {"enabled": True, "every": 1, "modules": ["down_proj", "v_proj"]}})
        group = LearnerGroup(cfg, tiny_model_path, lora, attach=attach_to_learner)
        try:
            out[ranks] = [group.train_step(batch) for _ in range(2)]
        finally:
            group.shutdown()
    for one, two in zip(out[1], out[2]):
        keys = [k for k in one if k.startswith("diag/")]
        assert "diag/G/layers.0.self_attn.v_proj/eff_rank" in keys and "diag/lora/norm_mean" in keys
        for k in keys:
            assert two[k] == pytest.approx(one[k], rel=1e-3, abs=1e-6, nan_ok=True), k
    assert out[1][1]["diag/G/cos_lag1_mean"] > 0.5  # one small update apart on the same batch
