"""The FSDP2 learner on real Ray actors and real gloo, with the tiny Llama.

Groups are expensive to start (a process per rank), so each class builds its groups
once and its tests share them; the class-scoped fixtures also keep at most four rank
actors alive at a time, which is what the session's Ray has CPUs for.
"""
from __future__ import annotations

import math

import pytest
import torch

from rl.config import config_from_dict
from rl.learner.group import LearnerGroup, TrainBatch, split_batch
from rl.learner.optim import lr_factor

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
TOL = 1e-5


def make_cfg(path: str, **sections) -> object:
    tree = {"model": {"name": path}, "trainer": {"steps": 10, "seed": 0}, "rollout": {"temperature": 1.0}}
    for name, values in sections.items():
        tree[name] = {**tree.get(name, {}), **values}
    return config_from_dict(tree)


def make_batch(B: int, T: int = 20, seed: int = 0) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 2000, (B, T), generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    attn = (torch.arange(T)[None] < lengths[:, None]).long()
    resp = attn.float()
    resp[:, :5] = 0  # a 5-token prompt
    rollout_lp = torch.where(resp.bool(), -10.0 + 0.1 * torch.randn(B, T, generator=g), 0.0)
    return TrainBatch(ids, attn, resp, torch.randn(B, generator=g), rollout_lp, max_tokens=T)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ----------------------------------------------------------------------------- pure parts

def test_split_batch_pads_with_zero_loss_rows():
    batch = make_batch(7)
    shards = split_batch(batch, 2)
    assert [s["input_ids"].shape[0] for s in shards] == [4, 4]
    assert torch.equal(torch.cat([s["input_ids"] for s in shards])[:7], batch.input_ids)
    assert shards[1]["response_mask"][-1].sum() == 0 and shards[1]["advantages"][-1] == 0
    assert sum(float(s["response_mask"].sum()) for s in shards) == float(batch.response_mask.sum())


def test_lr_schedule_warmup_then_cosine_to_floor():
    f = dict(warmup_steps=2, total_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, **f) == 0.5 and lr_factor(1, **f) == 1.0 and lr_factor(2, **f) == 1.0
    assert math.isclose(lr_factor(10, **f), 0.1) and lr_factor(5, **f) > lr_factor(6, **f)
    assert lr_factor(7, **{**f, "schedule": "constant"}) == 1.0


def test_bad_batch_is_rejected_in_one_line():
    batch = make_batch(2)
    batch.response_mask[0, 0] = 1
    with pytest.raises(ValueError, match="position 0"):
        batch.validate()


def test_rank_pattern_that_falls_back_is_caught(tiny_model_path):
    from peft import LoraConfig, get_peft_model

    from core.lora import check_lora_shapes
    from core.models import load_model

    # "layers.0.mlp.down" matches nothing (PEFT anchors at the end): PEFT silently uses r=4.
    cfg = {**LORA, "rank_pattern": {r"layers\.0\.mlp\.down": 8}}
    model = get_peft_model(load_model(tiny_model_path), LoraConfig(**cfg))
    with pytest.raises(ValueError, match="matched no LoRA module"):
        check_lora_shapes(model, cfg)


# ----------------------------------------------------------------------------- equivalences

@pytest.fixture(scope="class")
def groups(ray_local, tiny_model_path):
    learner = {"lr": 1e-2, "updates_per_batch": 2, "warmup_steps": 1}
    built = {}
    try:
        for name, extra in {"one": {"num_ranks": 1, "micro_batch_size": 8},
                            "two": {"num_ranks": 2, "micro_batch_size": 8},
                            "micro": {"num_ranks": 1, "micro_batch_size": 2}}.items():
            cfg = make_cfg(tiny_model_path, learner={**learner, **extra})
            built[name] = LearnerGroup(cfg, tiny_model_path, LORA)
        init = built["one"].lora_state()
        steps = []
        for batch in (make_batch(8, seed=1), make_batch(7, seed=2)):  # 7: uneven over 2 ranks
            metrics = {k: g.train_step(batch) for k, g in built.items()}
            steps.append((metrics, {k: g.lora_state() for k, g in built.items()}))
        yield {"groups": built, "init": init, "steps": steps}
    finally:
        for g in built.values():
            g.shutdown()


@pytest.fixture(scope="class")
def saved(groups, tmp_path_factory):
    g = groups["groups"]
    g["two"].train_step(make_batch(8, seed=3))  # "two" is now one step ahead of "micro"
    d = tmp_path_factory.mktemp("ckpt") / "learner"
    g["two"].save(str(d))
    probe = make_batch(4, seed=9)
    return {"dir": d, "state": g["two"].lora_state(), "probe": probe,
            "logprobs": g["two"].logprobs(probe, temperature=1.0)}


@pytest.mark.slow
class TestEquivalence:
    """1 rank vs 2 ranks vs micro-batches of 2: the same updates, within fp32 rounding."""

    def test_two_ranks_match_one_rank(self, groups):
        for metrics, states in groups["steps"]:
            assert max_diff(states["one"], groups["init"]) > 1e-3  # the update is not trivial
            assert max_diff(states["one"], states["two"]) < TOL
            for k in ("loss", "pg_loss", "grad_norm", "entropy", "clip_fraction", "lr", "tokens"):
                assert math.isclose(metrics["one"][k], metrics["two"][k], rel_tol=1e-4, abs_tol=1e-6), k
            assert metrics["one"]["skipped"] == 0

    def test_micro_batching_matches(self, groups):
        for metrics, states in groups["steps"]:
            assert max_diff(states["one"], states["micro"]) < TOL
            assert math.isclose(metrics["one"]["loss"], metrics["micro"]["loss"], rel_tol=1e-4, abs_tol=1e-6)

    def test_second_update_uses_old_logprobs(self, groups):
        metrics, _ = groups["steps"][0]
        m = metrics["one"]
        # Two updates per batch: the second one's ratio is away from 1, so ratio_mean moves.
        assert m["ratio_mean"] != 1.0 and 0 < m["lr"] <= 1e-2
        assert m["logprob_mismatch_abs_diff_mean"] > 0 and set(m) >= {"time_s", "tokens", "entropy"}

    def test_save_load_restores_the_next_step(self, groups, saved):
        two, micro = groups["groups"]["two"], groups["groups"]["micro"]
        assert max_diff(micro.lora_state(), saved["state"]) > 1e-4  # otherwise loading proves nothing
        micro.load(str(saved["dir"]))  # a 2-rank checkpoint into a 1-rank group
        assert max_diff(micro.lora_state(), saved["state"]) == 0
        batch = make_batch(8, seed=4)
        m_two, m_micro = two.train_step(batch), micro.train_step(batch)
        assert m_two["lr"] == m_micro["lr"]
        # Adam's moments and step count decide this update: a lost optimizer state shows here.
        assert max_diff(two.lora_state(), micro.lora_state()) < TOL

    def test_saved_adapter_loads_with_peft(self, saved, tiny_model_path):
        from peft import PeftModel

        from rl.grpo import token_logprobs
        from core.models import load_model

        d = saved["dir"]
        for name in ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt"):
            assert (d / name).is_file(), name
        model = PeftModel.from_pretrained(load_model(tiny_model_path), str(d)).eval()
        live = {k: v for k, v in model.named_parameters() if "lora_" in k}
        assert max_diff(live, saved["state"]) == 0
        p = saved["probe"]
        with torch.no_grad():
            logits = model(input_ids=p.input_ids, attention_mask=p.attention_mask).logits[:, :-1]
        lp = token_logprobs(logits, p.input_ids[:, 1:])
        keep = p.attention_mask[:, 1:].bool()
        assert (lp - saved["logprobs"][:, 1:])[keep].abs().max() < 1e-4


# ----------------------------------------------------------------------------- masks, KL, NaN

DOWN0 = "base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight"
Q1 = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight"


@pytest.fixture(scope="class")
def run(ray_local, tiny_model_path, tmp_path_factory):
    lora = {**LORA, "rank_pattern": {r"model\.layers\.0\.mlp\.down_proj": 8,
                                     r"model\.layers\.1\.self_attn\.v_proj": 2},
            "alpha_pattern": {r"model\.layers\.0\.mlp\.down_proj": 32}}
    g = torch.Generator().manual_seed(5)
    masks = {DOWN0: torch.rand(128, 8, generator=g) < 0.3, Q1: torch.rand(128, 4, generator=g) < 0.3}
    cfg = make_cfg(tiny_model_path, learner={"num_ranks": 2, "lr": 1e-2, "micro_batch_size": 4,
                                             "weight_decay": 0.1},
                   algorithm={"kl_coef": 0.1})
    group = LearnerGroup(cfg, tiny_model_path, lora, b_masks=masks)
    try:
        init = group.lora_state()
        metrics = [group.train_step(make_batch(8, seed=s)) for s in range(4)]
        yield {"group": group, "init": init, "metrics": metrics, "masks": masks,
               "state": group.lora_state(), "tmp": tmp_path_factory.mktemp("nan")}
    finally:
        group.shutdown()


@pytest.mark.slow
class TestMaskedMixedRank:
    """2 ranks, a mixed rank_pattern/alpha_pattern adapter, B masks, KL to the disabled adapter."""

    def test_mixed_rank_pattern_shapes(self, run):
        s = run["init"]
        assert s[DOWN0].shape == (128, 8) and s[DOWN0.replace("lora_B", "lora_A")].shape == (8, 256)
        v1 = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.default.weight"
        assert s[v1].shape == (2, 128) and s[v1.replace("lora_A", "lora_B")].shape == (64, 2)
        assert s["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"].shape == (4, 128)

    def test_masked_b_entries_stay_zero(self, run):
        for name, mask in run["masks"].items():
            b = run["state"][name]
            assert torch.count_nonzero(b[~mask]) == 0
            assert torch.count_nonzero(b[mask]) > 0.9 * mask.sum()  # the kept entries do train
            a = name.replace("lora_B", "lora_A")
            assert torch.equal(run["state"][a], run["init"][a])  # a masked module's A is frozen
        v0 = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.default.weight"
        assert torch.count_nonzero(run["state"][v0]) == run["state"][v0].numel()

    def test_kl_to_disabled_adapter(self, run):
        kls = [m["kl"] for m in run["metrics"]]
        assert kls[0] == 0.0  # B = 0: the adapter changes nothing yet
        assert kls[-1] > 1e-6

    @pytest.mark.parametrize("row", [0, 7], ids=["nan-on-rank-0", "nan-on-rank-1"])
    def test_nan_batch_is_skipped_without_touching_state(self, run, row):
        group, tmp = run["group"], run["tmp"] / f"row{row}"
        group.save(str(tmp / "before"))
        state = group.lora_state()
        bad = make_batch(8, seed=11)
        bad.advantages[row] = float("nan")  # rows 0-3 go to rank 0, rows 4-7 to rank 1
        m = group.train_step(bad)
        assert m["skipped"] == 1 and not math.isfinite(m["loss"])
        group.save(str(tmp / "after"))
        assert max_diff(group.lora_state(), state) == 0
        before = torch.load(tmp / "before" / "optimizer.pt", weights_only=True)
        after = torch.load(tmp / "after" / "optimizer.pt", weights_only=True)
        assert before["state"].keys() == after["state"].keys() and len(before["state"]) > 0
        for k, st in before["state"].items():
            for field, v in st.items():
                assert torch.equal(v, after["state"][k][field]), (k, field)
        sched = [torch.load(tmp / d / "scheduler.pt", weights_only=True) for d in ("before", "after")]
        assert sched[0] == sched[1]
        ok = group.train_step(make_batch(8, seed=12))
        assert ok["skipped"] == 0 and math.isfinite(ok["grad_norm"])


# ----------------------------------------------------------------------------- SFT

@pytest.mark.slow
def test_sft_loss_is_the_response_nll_and_falls(ray_local, tiny_model_path):
    cfg = make_cfg(tiny_model_path, learner={"lr": 1e-2, "micro_batch_size": 3},
                   algorithm={"loss": "sft", "loss_agg": "seq-mean-token-mean"})

    # Defined in here so that Ray ships it by value (a worker cannot import the test module).
    def _attach_grad_probe(peft_model, cfg):
        """A diagnostics stand-in: after backward, report that LoRA gradients are there."""
        calls = []

        def after_backward(step):
            calls.append(step)
            # Looked up now: fully_shard replaced the Parameter objects that existed at attach time.
            lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
            return {"probe/calls": len(calls), "probe/grads_present": float(all(p.grad is not None for p in lora_b))}

        return [after_backward]

    group = LearnerGroup(cfg, tiny_model_path, LORA, attach=_attach_grad_probe)
    try:
        batch = make_batch(5, seed=21)
        lp = group.logprobs(batch, temperature=1.0)
        mask = batch.response_mask
        nll = float(((-lp * mask).sum(1) / mask.sum(1)).mean())  # mean over sequences of token means
        metrics = [group.train_step(batch) for _ in range(4)]
        losses = [m["loss"] for m in metrics]
        assert math.isclose(losses[0], nll, rel_tol=1e-5)
        assert losses[-1] < losses[0] - 0.05
        assert "pg_loss" not in metrics[0]
        # The diagnostics seam: called once per update, after backward, on the sharded model.
        assert [m["probe/calls"] for m in metrics] == [1, 2, 3, 4]
        assert all(m["probe/grads_present"] == 1.0 for m in metrics)
    finally:
        group.shutdown()


def grouped_batch(prompts: int, group: int, seed: int) -> TrainBatch:
    """GRPO's layout: ``group`` completions of each prompt, contiguous, prompts of different lengths."""
    from rl.learner.batch import pad_sequences

    g = torch.Generator().manual_seed(seed)
    prompt_ids = [torch.randint(0, 2000, (int(n),), generator=g).tolist()
                  for n in torch.randint(4, 9, (prompts,), generator=g)]
    prompt_ids = [p for p in prompt_ids for _ in range(group)]
    responses = [torch.randint(0, 2000, (int(n),), generator=g).tolist()
                 for n in torch.randint(2, 10, (len(prompt_ids),), generator=g)]
    lps = [(-10.0 + 0.1 * torch.randn(len(r), generator=g)).tolist() for r in responses]
    ids, attn, resp, rollout_lp = pad_sequences(prompt_ids, responses, 0, lps)
    return TrainBatch(ids, attn, resp, torch.randn(len(prompt_ids), generator=g), rollout_lp, max_tokens=ids.shape[1])


@pytest.mark.slow
def test_shared_prompts_and_chunked_head_match_whole_rows(ray_local, tiny_model_path):
    """The learner's defaults (one forward per shared prompt, logprobs from the hidden states in
    chunks) against whole rows and whole logits: the same updates, within fp32 rounding."""
    learner = {"lr": 1e-2, "updates_per_batch": 2, "micro_batch_size": 8}
    built = {}
    try:
        built["default"] = LearnerGroup(make_cfg(tiny_model_path, learner={**learner, "logprob_chunk": 5}),
                                        tiny_model_path, LORA)
        built["whole"] = LearnerGroup(make_cfg(tiny_model_path, learner={**learner, "logprob_chunk": 0,
                                                                         "shared_prefix": False}),
                                      tiny_model_path, LORA)
        init = built["default"].lora_state()
        for seed in (1, 2):
            batch = grouped_batch(4, 4, seed)
            metrics = {k: g.train_step(batch) for k, g in built.items()}
            for k in ("loss", "pg_loss", "grad_norm", "entropy", "clip_fraction", "ratio_mean"):
                assert math.isclose(metrics["default"][k], metrics["whole"][k], rel_tol=1e-4, abs_tol=1e-6), k
        states = {k: g.lora_state() for k, g in built.items()}
        assert max_diff(states["default"], init) > 1e-3
        assert max_diff(states["default"], states["whole"]) < TOL
        probe = grouped_batch(2, 4, 3)
        lp = {k: g.logprobs(probe, temperature=1.0) for k, g in built.items()}
        assert (lp["default"] - lp["whole"]).abs().max() < 1e-4
    finally:
        for g in built.values():
            g.shutdown()


def uneven_batch(seed: int) -> TrainBatch:
    """Four GRPO groups of four; the first two groups' completions are long, the last two short,
    so that token-budget planning reorders rows and the two ranks' shards need different plans."""
    from rl.learner.batch import pad_sequences

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 2000, (int(n),), generator=g).tolist() for n in torch.randint(4, 9, (4,), generator=g)]
    prompt_ids = [p for p in prompts for _ in range(4)]
    spans = [(20, 41)] * 8 + [(1, 8)] * 8
    responses = [torch.randint(0, 2000, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
                 for lo, hi in spans]
    lps = [(-10.0 + 0.1 * torch.randn(len(r), generator=g)).tolist() for r in responses]
    ids, attn, resp, rollout_lp = pad_sequences(prompt_ids, responses, 0, lps)
    return TrainBatch(ids, attn, resp, torch.randn(16, generator=g), rollout_lp, max_tokens=ids.shape[1])


@pytest.mark.slow
def test_token_budget_micro_batches_match_fixed_ones(ray_local, tiny_model_path):
    """Rows packed by length (learner.micro_batch_tokens) on 1 rank (GRPO groups kept whole for
    the shared-prefix forward) and on 2 ranks (plans split to the same count) against fixed
    micro-batches of 8 rows: the same updates and per-row logprobs in the original row order."""
    import ray

    from rl.learner.batching import plan_micro_batches

    learner = {"lr": 1e-2, "updates_per_batch": 2, "micro_batch_size": 8}
    budget = 120
    batch = uneven_batch(1)
    # One rank: each long group alone, the two short groups together (not the fixed 8 + 8 rows).
    plan = plan_micro_batches(split_batch(batch, 1)[0], 8, budget, keep_groups=True)
    assert sorted(plan) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15]]
    plans = [plan_micro_batches(s, 8, budget) for s in split_batch(batch, 2)]
    assert len(plans[0]) > len(plans[1])  # the 2-rank group must even them out
    built = {}
    try:
        for name, extra in {"fixed": {}, "packed": {"micro_batch_tokens": budget},
                            "packed2": {"micro_batch_tokens": budget, "num_ranks": 2}}.items():
            built[name] = LearnerGroup(make_cfg(tiny_model_path, learner={**learner, **extra}), tiny_model_path, LORA)
        init = built["fixed"].lora_state()
        lp = {k: g.logprobs(batch, temperature=1.0) for k, g in built.items()}
        assert lp["fixed"].abs().sum() > 0
        for k in ("packed", "packed2"):
            assert (lp[k] - lp["fixed"]).abs().max() < 1e-4, k
        # The step's own pre-update logprobs, straight from the ranks (as LearnerGroup.train_step calls them).
        totals = {"num_sequences": 16, "num_tokens": float(batch.response_mask.sum()), "max_tokens": batch.max_tokens}
        outs = {}
        for k, g in built.items():
            ranks = ray.get([r.train_step.remote(s, totals) for r, s in zip(g.ranks, split_batch(batch, g.n))])
            outs[k] = {"learner_logprobs": torch.cat([o["learner_logprobs"] for o in ranks]),
                       **{m: sum(o[m] for o in ranks) for m in ("loss", "pg_loss", "entropy_sum", "clip_fraction_tok")}}
        mask = batch.response_mask.bool()
        for k, out in outs.items():
            assert ((out["learner_logprobs"] - lp["fixed"]) * mask).abs().max() < 1e-4, k
            for m in ("loss", "pg_loss", "entropy_sum", "clip_fraction_tok"):
                assert math.isclose(out[m], outs["fixed"][m], rel_tol=1e-4, abs_tol=1e-6), (k, m)
        states = {k: g.lora_state() for k, g in built.items()}
        assert max_diff(states["fixed"], init) > 1e-3
        assert max_diff(states["packed"], states["fixed"]) < TOL
        assert max_diff(states["packed2"], states["fixed"]) < TOL
        # A second step through the group, as the trainer runs it.
        batch2 = uneven_batch(2)
        m = {k: g.train_step(batch2) for k, g in built.items()}
        for k in ("packed", "packed2"):
            for key in ("loss", "grad_norm", "entropy", "clip_fraction", "logprob_mismatch_abs_diff_mean"):
                assert math.isclose(m[k][key], m["fixed"][key], rel_tol=1e-4, abs_tol=1e-6), (k, key)
        states = {k: g.lora_state() for k, g in built.items()}
        assert max_diff(states["packed"], states["fixed"]) < TOL
        assert max_diff(states["packed2"], states["fixed"]) < TOL
    finally:
        for g in built.values():
            g.shutdown()

