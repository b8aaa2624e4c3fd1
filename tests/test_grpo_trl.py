"""rl.grpo against TRL 1.16's GRPO on identical float64 inputs, running TRL's own code.

TRL's advantages, truncated IS ratios and loss live inside GRPOTrainer methods, so the tests call
those unbound methods (``_generate_and_score_completions``, ``_calculate_rewards``,
``_compute_loss``) on ``TRLHarness``: an object carrying the attributes they read, copied from a
real ``GRPOConfig`` the way ``GRPOTrainer.__init__`` copies them, with a real ``Accelerator`` and
``TrainerState``. Only the two model-facing steps are supplied by the harness: ``_generate``
returns fixed completions and ``_get_per_token_logps_and_entropies`` returns fixed per-token
logprobs (a leaf tensor, so the gradient of TRL's loss can be compared). TRL's log-softmax and
entropy helpers are plain functions and are called directly.

Mapping (TRL loss_type -> our loss_agg):
  "grpo"    -> "seq-mean-token-mean"      (TRL divides by gradient-accumulation steps; we by the
                                           global num_sequences: equal for equal micro-batches)
  "bnpo"    -> "token-mean"               (TRL: per micro-batch token mean / accumulation steps;
                                           equal to ours for one micro-batch)
  "dr_grpo" -> "seq-mean-token-sum-norm"  (max_tokens = max_completion_length)
  "dapo"    -> "token-mean" with num_tokens = TRL's num_items_in_batch (global token count)
  beta (k3, use_bias_correction_kl=False) -> kl_coef with kl_estimator="k3"
  epsilon / epsilon_high                  -> epsilon_low / epsilon_high
  scale_rewards "group" / "none"          -> std_normalize True / False
  vllm_importance_sampling_mode="token_truncate", clip_max=C -> truncated_is_weights(cap=C)
Ours only: k1/k2 estimators; global num_sequences for unequal micro-batches. TRL only (not
here): cispo/sapo/vespo/luspo, sequence-level IS, delta, entropy masks and bonus, off-policy
masks, use_bias_correction_kl=True (TRL's default: KL scaled by the ratio), batch reward scaling.
"""

from collections import defaultdict

import pytest
import torch
from accelerate import Accelerator
from transformers import TrainerState
from trl import GRPOConfig
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.utils import entropy_from_logits, selective_log_softmax, split_tensor_dict

from rl import grpo

F64 = torch.float64
G, PROMPTS, T = 4, 2, 6
LENGTHS = [6, 3, 5, 1, 4, 6, 2, 5]
# float32-exact rewards (TRL stores them as float32 before the float64 arithmetic)
REWARDS = [1.0, 0.0, 0.5, 1.0, 2.0, -1.0, 0.25, 3.0]


def reward_from_column(prompts, completions, reward, **kwargs):
    """A TRL reward function that returns the dataset's `reward` column."""
    return list(reward)


class TRLHarness:
    _generate_and_score_completions = GRPOTrainer._generate_and_score_completions
    _calculate_rewards = GRPOTrainer._calculate_rewards
    _compute_loss = GRPOTrainer._compute_loss
    _log_completion_extra = GRPOTrainer._log_completion_extra
    _log_metric = GRPOTrainer._log_metric

    def __init__(self, args, logps, rollout_logps=None, ref_logps=None):
        self.args, self.accelerator, self.state = args, Accelerator(cpu=True), TrainerState()
        self.model = torch.nn.Module()
        self.model.is_gradient_checkpointing = False
        self.ref_model = torch.nn.Module() if args.beta != 0.0 else None
        for name in ["pad_to_multiple_of", "use_vllm", "vllm_importance_sampling_correction",
                     "vllm_importance_sampling_mode", "vllm_importance_sampling_clip_max",
                     "vllm_importance_sampling_clip_min", "loss_type", "multi_objective_aggregation",
                     "scale_rewards", "importance_sampling_level", "off_policy_mask_threshold",
                     "mask_truncated_completions", "top_entropy_quantile", "entropy_coef",
                     "use_adaptive_entropy", "num_iterations", "beta", "num_generations", "log_multimodal",
                     "max_completion_length"]:
            setattr(self, name, getattr(args, name))
        self.epsilon_low = args.epsilon
        self.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        self._entropy_bonus_enabled = self.entropy_coef != 0.0 or self.use_adaptive_entropy
        self.aux_loss_enabled = False
        self.environment_factories, self.environments, self.tools = None, None, []
        self.reward_funcs = [reward_from_column]
        self.reward_processing_classes = [None]
        self.reward_func_names = ["reward_from_column"]
        self.reward_weights = torch.ones(1, dtype=torch.float32)
        self._tokenizer = type("Tok", (), {"pad_token_id": 0})()
        self.eos_token_ids = [1]
        self.current_gradient_accumulation_steps = args.gradient_accumulation_steps
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._logs = {"images": [], "prompt": [], "completion": [], "rewards": defaultdict(list),
                      "advantages": [], "extra": defaultdict(list)}
        self._pending_extra_logs, self._pending_metrics = defaultdict(list), defaultdict(list)
        self.logps, self.rollout_logps, self.ref_logps = logps, rollout_logps, ref_logps

    def _generate(self, prompts):
        ids = [[2] * 3 for _ in prompts]
        completion_ids = [[5 + j for j in range(n)] for n in LENGTHS]
        sampling = None if self.rollout_logps is None else [
            self.rollout_logps[i, :n].tolist() for i, n in enumerate(LENGTHS)]
        return ids, completion_ids, None, ["text"] * len(prompts), sampling, {}, None, None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        logps = self.ref_logps if model is self.ref_model else self.logps
        return logps, torch.zeros_like(logps.detach()), None


def make_config(tmp_path, **overrides):
    kw = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=PROMPTS * G,
              num_generations=G, max_completion_length=T, beta=0.0, use_bias_correction_kl=False)
    kw.update(overrides)
    return GRPOConfig(**kw)


def score(args, logps=None, rollout_logps=None, ref_logps=None):
    """TRL's own generation-side path (rewards -> advantages -> IS ratios) on fixed completions."""
    logps = torch.zeros(len(LENGTHS), T, dtype=F64) if logps is None else logps
    harness = TRLHarness(args, logps, rollout_logps, ref_logps)
    inputs = [{"prompt": f"q{i // G}", "reward": r} for i, r in enumerate(REWARDS)]
    return harness, harness._generate_and_score_completions(inputs)


@pytest.fixture(autouse=True)
def float64_default():
    prev = torch.get_default_dtype()
    torch.set_default_dtype(F64)  # TRL builds its reward buffer with the default dtype
    yield
    torch.set_default_dtype(prev)


@pytest.fixture(scope="module")
def tensors():
    g = torch.Generator().manual_seed(7)
    old = -torch.rand(len(LENGTHS), T, generator=g, dtype=F64) * 3
    return {"old": old, "current": old + 0.35 * torch.randn(len(LENGTHS), T, generator=g, dtype=F64),
            "rollout": old + 0.2 * torch.randn(len(LENGTHS), T, generator=g, dtype=F64),
            "ref": old + 0.3 * torch.randn(len(LENGTHS), T, generator=g, dtype=F64)}


@pytest.mark.parametrize("scale_rewards,std_normalize", [("group", True), ("none", False)])
def test_advantages_match_trl(tmp_path, scale_rewards, std_normalize):
    _, out = score(make_config(tmp_path, scale_rewards=scale_rewards))
    ours = grpo.group_advantages(torch.tensor(REWARDS, dtype=F64), G, std_normalize=std_normalize)
    assert out["advantages"].dtype == F64
    torch.testing.assert_close(ours, out["advantages"], atol=1e-6, rtol=0)
    assert out["advantages"].abs().max() > 0.5  # not a trivially zero batch


def test_zero_variance_matches_trl_frac_reward_zero_std(tmp_path):
    rewards = [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    harness = TRLHarness(make_config(tmp_path), torch.zeros(len(LENGTHS), T, dtype=F64))
    harness._generate_and_score_completions([{"prompt": f"q{i // G}", "reward": r} for i, r in enumerate(rewards)])
    ours = grpo.zero_variance_groups(torch.tensor(rewards), G)
    assert ours.tolist() == [True, False]
    assert harness._metrics["train"]["frac_reward_zero_std"] == [pytest.approx(ours.double().mean().item())]


def test_truncated_is_and_mismatch_match_trl(tmp_path, tensors):
    args = make_config(tmp_path, use_vllm=True, vllm_importance_sampling_correction=True,
                       vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=1.1)
    harness, out = score(args, logps=tensors["current"], rollout_logps=tensors["rollout"])
    mask = out["completion_mask"].bool()
    ours = grpo.truncated_is_weights(tensors["current"], tensors["rollout"], mask, cap=1.1)
    torch.testing.assert_close(ours[mask], out["importance_sampling_ratio"][mask], atol=1e-6, rtol=0)
    assert (out["importance_sampling_ratio"][mask] == 1.1).any()  # the cap was reached
    mm = grpo.logprob_mismatch(tensors["current"], tensors["rollout"], mask)
    trl_metrics = harness._metrics["train"]
    for ours_key, trl_key in [("abs_diff_mean", "mean"), ("abs_diff_max", "max")]:
        trl_value = trl_metrics[f"sampling/sampling_logp_difference/{trl_key}"][0]
        assert mm[ours_key].item() == pytest.approx(trl_value, abs=1e-6)


def trl_loss(args, inputs, current, ref=None):
    """TRL's _compute_loss on `inputs` with `current` as the policy's per-token logprobs."""
    leaf = current.clone().requires_grad_()
    harness = TRLHarness(args, leaf, ref_logps=ref)
    harness.model.train()
    loss = harness._compute_loss(harness.model, inputs)
    loss.backward()
    return loss.detach(), leaf.grad, harness._metrics["train"]


LOSS_CASES = [("grpo", "seq-mean-token-mean"), ("bnpo", "token-mean"),
              ("dr_grpo", "seq-mean-token-sum-norm"), ("dapo", "token-mean")]


@pytest.mark.parametrize("loss_type,loss_agg", LOSS_CASES)
@pytest.mark.parametrize("eps_high,beta,tis", [(0.2, 0.0, False), (0.28, 0.04, False), (0.28, 0.04, True)])
def test_policy_loss_matches_trl(tmp_path, tensors, loss_type, loss_agg, eps_high, beta, tis):
    extra = dict(use_vllm=True, vllm_importance_sampling_correction=True, vllm_importance_sampling_clip_max=1.1,
                 vllm_importance_sampling_mode="token_truncate") if tis else {}
    args = make_config(tmp_path, loss_type=loss_type, epsilon=0.2, epsilon_high=eps_high, beta=beta, **extra)
    # the old logprobs enter as TRL's learner logprobs at generation time
    _, inputs = score(args, logps=tensors["old"], rollout_logps=tensors["rollout"] if tis else None,
                      ref_logps=tensors["ref"] if beta else None)
    inputs["old_per_token_logps"] = tensors["old"]
    loss, grad, metrics = trl_loss(args, inputs, tensors["current"])

    mask = inputs["completion_mask"]
    lp = tensors["current"].clone().requires_grad_()
    isw = grpo.truncated_is_weights(tensors["old"], tensors["rollout"], mask, cap=1.1) if tis else None
    ours, met = grpo.policy_loss(
        lp, tensors["old"], inputs["advantages"], mask, epsilon_low=0.2, epsilon_high=eps_high, loss_agg=loss_agg,
        max_tokens=args.max_completion_length, num_tokens=inputs["num_items_in_batch"].item() if loss_type == "dapo"
        else None, ref_logprobs=tensors["ref"] if beta else None, kl_coef=beta, kl_estimator="k3", is_weights=isw)
    ours.backward()
    assert abs(ours.item() - loss.item()) < 1e-6
    assert grad.abs().max() > 1e-2  # a non-trivial gradient to compare
    torch.testing.assert_close(lp.grad, grad, atol=1e-6, rtol=0)
    assert met["clip_low_fraction"].item() == pytest.approx(metrics["clip_ratio/low_mean"][0], abs=1e-6)
    assert met["clip_high_fraction"].item() == pytest.approx(metrics["clip_ratio/high_mean"][0], abs=1e-6)
    assert met["clip_fraction"].item() == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=1e-6)
    assert met["clip_fraction"].item() > 0  # the inputs reach the clip range
    if beta:
        assert met["kl"].item() == pytest.approx(metrics["kl"][0], abs=1e-6)


@pytest.mark.parametrize("loss_type,loss_agg", [("grpo", "seq-mean-token-mean"), ("dapo", "token-mean"),
                                                ("dr_grpo", "seq-mean-token-sum-norm")])
def test_gradient_accumulation_matches_trl(tmp_path, tensors, loss_type, loss_agg):
    """Two micro-batches: TRL's accumulation-scaled losses and ours with global counts agree."""
    args = make_config(tmp_path, loss_type=loss_type, epsilon_high=0.28, beta=0.04, gradient_accumulation_steps=2)
    _, inputs = score(args, logps=tensors["old"], ref_logps=tensors["ref"])
    inputs["old_per_token_logps"] = tensors["old"]
    n_tok, n_seq = inputs["num_items_in_batch"].item(), len(LENGTHS)
    half = len(LENGTHS) // 2
    for i, chunk in enumerate(split_tensor_dict(inputs, 2)):
        rows = slice(i * half, (i + 1) * half)
        loss, grad, _ = trl_loss(args, chunk, tensors["current"][rows])
        lp = tensors["current"][rows].clone().requires_grad_()
        ours, _ = grpo.policy_loss(lp, tensors["old"][rows], chunk["advantages"], chunk["completion_mask"],
                                   epsilon_high=0.28, loss_agg=loss_agg, max_tokens=T, num_sequences=n_seq,
                                   num_tokens=n_tok, ref_logprobs=tensors["ref"][rows], kl_coef=0.04)
        ours.backward()
        assert abs(ours.item() - loss.item()) < 1e-6
        torch.testing.assert_close(lp.grad, grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_and_entropy_match_trl_helpers(temperature):
    g = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(3, 5, 40, generator=g, dtype=F64)
    labels = torch.randint(0, 40, (3, 5), generator=g)
    torch.testing.assert_close(grpo.token_logprobs(logits, labels, temperature),
                               selective_log_softmax(logits, labels, temperature), atol=1e-6, rtol=0)
    torch.testing.assert_close(grpo.entropy_from_logits(logits, temperature),
                               entropy_from_logits(logits / temperature), atol=1e-6, rtol=0)
