"""One typed config tree for every placerl command.

A run is configured by a YAML recipe (``launch/configs/*.yaml``) plus dotted
command-line overrides (``learner.lr=1e-5``). Everything is validated when it is
loaded, before any actor starts: an unknown key, a value of the wrong type or an
impossible value raises :class:`ConfigError` with one line that names the key, the
value and what is allowed (and the closest valid key for a misspelling).

The sections are plain dataclasses so that a reader sees every option, its type and
its default in one place (the ``rollout`` section, mostly vLLM's, in rl/rollout/config.py);
the loader below is generic over them.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from core.lora import DEFAULT_TARGET_MODULES
from rl.typed_yaml import ConfigError, build, merge, parse_overrides, read_recipe  # ConfigError: re-exported for callers
from rl.typed_yaml import check as _check, one_of as _one_of
from rl.rollout.config import RolloutConfig  # noqa: F401 - a section of Config, re-exported


@dataclass
class ModelConfig:
    # A hub id ("Qwen/Qwen2.5-0.5B-Instruct"), a local checkpoint folder, a .gguf file
    # (dequantised once to a bf16 folder in the cache), or a builtin alias:
    # "smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct" (from pip packages) or "tiny-llama".
    name: str = "smollm2-135m-instruct"
    dtype: str = "float32"  # learner parameters; mixed precision is learner.mixed_precision
    cache_dir: str = ""  # where builtin models are materialised; default ~/.cache/placerl
    trust_remote_code: bool = False

    def validate(self, p: str) -> None:
        _check(bool(self.name), f"{p}.name", self.name, "a hub id, a folder or a builtin alias")
        _one_of(f"{p}.dtype", self.dtype, ["float32", "bfloat16", "float16"])


@dataclass
class DataConfig:
    task: str = "gsm8k"  # gsm8k | synthetic
    # GSM8K source: a folder holding train.jsonl/test.jsonl, or a single jsonl file; ""
    # uses $PLACERL_GSM8K_DIR, else the hub, else the copy shipped in rl/bundled.
    path: str = ""
    instruction: str = (
        "Solve the math problem step by step. "
        "Finish with a final line of the form '#### <number>'."
    )
    chat_template: bool = True  # render prompts with the tokenizer's chat template
    max_prompt_tokens: int = 384
    seed: int = 0
    synthetic_size: int = 4096  # problems generated for task=synthetic
    synthetic_max_ops: int = 2  # arithmetic steps per synthetic problem
    # The last val_size train rows form the "val" split (for choosing hyperparameters);
    # training never samples them. 0: every train row trains.
    val_size: int = 0

    def validate(self, p: str) -> None:
        _one_of(f"{p}.task", self.task, ["gsm8k", "synthetic"])
        _check(self.max_prompt_tokens > 0, f"{p}.max_prompt_tokens", self.max_prompt_tokens, "must be > 0")
        _check(self.synthetic_size > 0, f"{p}.synthetic_size", self.synthetic_size, "must be > 0")
        _check(1 <= self.synthetic_max_ops <= 4, f"{p}.synthetic_max_ops", self.synthetic_max_ops, "1..4")
        _check(self.val_size >= 0, f"{p}.val_size", self.val_size, "must be >= 0 (0: no validation split)")


@dataclass
class LearnerConfig:
    num_ranks: int = 1  # FSDP2 world size
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    micro_batch_size: int = 8  # sequences per forward/backward; the rest is accumulation
    # > 0: rows sorted by length, packed so that rows x longest row <= this many tokens (at most
    # micro_batch_size rows): less padding (rl/learner/batching.py); 0: micro_batch_size rows in order.
    micro_batch_tokens: int = 0
    updates_per_batch: int = 1  # policy updates on each rollout batch (mu in GRPO)
    # > 0: at most this many loss tokens per step, the longest rows' tails masked out first
    # (rl/learner/token_cap.py), so that compared regimes train on equal tokens; 0: no cap.
    loss_token_cap: int = 0
    mixed_precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False
    # Positions per chunk of the output layer when computing token logprobs from the hidden
    # states (rl/learner/logprobs.py); 0: the model's whole [b, t, vocab] logits at once.
    logprob_chunk: int = 1024
    # One forward over a prompt that rows of a micro-batch share (a GRPO group), its KV cache
    # reused for each row's completion (rl/learner/shared_prefix.py); one rank, no checkpointing.
    shared_prefix: bool = True
    # > 0: each rank's N-th train step runs under torch's profiler (rl/learner/profiling.py);
    # its summary and table go to profile_dir (empty: <run>/profile), a Chrome trace too with
    # profile_trace.
    profile_step: int = 0
    profile_dir: str = ""
    profile_trace: bool = False
    # Compile each decoder layer with torch.compile (dynamic shapes): fewer, fused kernels for a
    # learner bound by kernel launches; the first steps pay for compiling. Off by default.
    compile: bool = False
    # never: a micro-batch of right-padded rows goes into the model without its padding mask.
    # Under causal attention no real token sees the padding after it, so nothing that gets a
    # label changes, and SDPA runs its causal kernel instead of the masked one (less memory).
    # always: the mask goes in every forward. auto: never for eager layers, always for
    # compiled ones (rl/learner/batching.py takes_padding_mask says why).
    padding_mask: str = "auto"

    def validate(self, p: str) -> None:
        _check(self.num_ranks >= 1, f"{p}.num_ranks", self.num_ranks, "must be >= 1")
        _check(self.lr > 0, f"{p}.lr", self.lr, "must be > 0")
        _check(self.weight_decay >= 0, f"{p}.weight_decay", self.weight_decay, "must be >= 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{p}.betas",
               self.betas, "two numbers in [0, 1)")
        _check(self.warmup_steps >= 0, f"{p}.warmup_steps", self.warmup_steps, "must be >= 0")
        _one_of(f"{p}.schedule", self.schedule, ["cosine", "constant"])
        _check(0 <= self.min_lr_ratio <= 1, f"{p}.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _check(self.max_grad_norm > 0, f"{p}.max_grad_norm", self.max_grad_norm, "must be > 0")
        _check(self.micro_batch_size >= 1, f"{p}.micro_batch_size", self.micro_batch_size, "must be >= 1")
        _check(self.micro_batch_tokens >= 0, f"{p}.micro_batch_tokens", self.micro_batch_tokens,
               "must be >= 0 (0: micro_batch_size rows in batch order)")
        _check(self.loss_token_cap >= 0, f"{p}.loss_token_cap", self.loss_token_cap,
               "must be >= 0 (0: no cap; N: at most N loss tokens per step)")
        _check(self.updates_per_batch >= 1, f"{p}.updates_per_batch", self.updates_per_batch, "must be >= 1")
        _one_of(f"{p}.mixed_precision", self.mixed_precision, ["auto", "fp32", "bf16"])
        _check(self.logprob_chunk >= 0, f"{p}.logprob_chunk", self.logprob_chunk,
               "must be >= 0 (0: whole logits at once)")
        _check(self.profile_step >= 0, f"{p}.profile_step", self.profile_step,
               "must be >= 0 (0: off; N: profile the learner's N-th step)")
        _one_of(f"{p}.padding_mask", self.padding_mask, ["auto", "always", "never"])


@dataclass
class AlgorithmConfig:
    loss: str = "grpo"  # grpo | sft (cross-entropy on gold solutions, same data and hooks)
    std_normalize: bool = True  # False gives Dr. GRPO's mean-centred advantages
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2  # > epsilon_low is DAPO's clip-higher
    loss_agg: str = "token-mean"
    kl_coef: float = 0.0  # KL to the base model (adapters disabled); 0 turns it off
    kl_estimator: str = "k3"
    filter_zero_variance: bool = False  # drop groups whose rewards are all equal
    overlong_mask: bool = False  # completions cut at max_new_tokens get no loss
    # Importance correction for the gap between the policy that sampled (the rollout engine, up
    # to trainer.max_staleness versions old) and the one that learns; rl/grpo.py, docs/async.md.
    # none | tis (token weights capped at tis_cap) | mis (drop sequences whose geometric-mean
    # ratio leaves [mis_low, mis_high]) | icepop (token weight k inside [icepop_low, icepop_high], 0 outside)
    is_correction: str = "none"
    tis_cap: float = 0.0  # with is_correction=tis: the cap on the token weights (>= 1)
    mis_low: float = 0.8
    mis_high: float = 1.25
    icepop_low: float = 0.5
    icepop_high: float = 2.0

    def validate(self, p: str) -> None:
        _one_of(f"{p}.loss", self.loss, ["grpo", "sft"])
        _check(self.epsilon_low > 0, f"{p}.epsilon_low", self.epsilon_low, "must be > 0")
        _check(self.epsilon_high > 0, f"{p}.epsilon_high", self.epsilon_high, "must be > 0")
        _one_of(f"{p}.loss_agg", self.loss_agg,
                ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
        _check(self.kl_coef >= 0, f"{p}.kl_coef", self.kl_coef, "must be >= 0")
        _one_of(f"{p}.kl_estimator", self.kl_estimator, ["k1", "k2", "k3"])
        _one_of(f"{p}.is_correction", self.is_correction, ["none", "tis", "mis", "icepop"])
        if self.is_correction == "tis":
            _check(self.tis_cap >= 1, f"{p}.tis_cap", self.tis_cap, "is_correction=tis needs a cap >= 1 (e.g. 2.0)")
        else:
            _check(self.tis_cap == 0, f"{p}.tis_cap", self.tis_cap,
                   f"it caps is_correction=tis weights; set {p}.is_correction=tis or tis_cap=0")
        for name in ("mis", "icepop"):
            low, high = getattr(self, f"{name}_low"), getattr(self, f"{name}_high")
            _check(0 < low < 1 < high, f"{p}.{name}_low/{name}_high", [low, high],
                   "a band around 1: 0 < low < 1 < high")


@dataclass
class RewardConfig:
    # Each entry: {name: <registry name | module:function | path.py:function>, weight: float}
    functions: list[dict] = field(default_factory=lambda: [{"name": "gsm8k_flexible", "weight": 1.0}])
    timeout_s: float = 10.0  # per call; a slower call gives its samples no reward
    workers: int = 4
    executor: str = "thread"  # thread | process

    def validate(self, p: str) -> None:
        _check(len(self.functions) > 0, f"{p}.functions", self.functions, "name at least one reward")
        for i, fn in enumerate(self.functions):
            _check(isinstance(fn, dict) and "name" in fn, f"{p}.functions[{i}]", fn,
                   "a mapping with a 'name' (and optionally 'weight')")
            extra = set(fn) - {"name", "weight", "kwargs"}
            _check(not extra, f"{p}.functions[{i}]", fn, "keys are name, weight, kwargs")
        _check(self.timeout_s > 0, f"{p}.timeout_s", self.timeout_s, "must be > 0")
        _check(self.workers >= 1, f"{p}.workers", self.workers, "must be >= 1")
        _one_of(f"{p}.executor", self.executor, ["thread", "process"])


@dataclass
class PlacementConfig:
    scorer: str = "uniform"  # uniform | random | page | plop | bmask | gradrank | a plugin
    plan: str = ""  # a PlacementPlan JSON written by `placerl score`; overrides scorer
    rank: int = 8  # the uniform baseline's rank; budgets are measured against it
    alpha: float = 16.0
    alpha_policy: str = "fixed"  # fixed | proportional (alpha/r constant) | rslora
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    budget: str = ""  # "" = the uniform baseline; "rank=N", "params=N" or "fraction=F"
    top_k: int = 1  # with an empty budget: modules kept by page/random, module types by plop
    probe_samples: int = 32
    # auto: the scorer's own regime (grpo for bmask and gradrank, whose papers score policy-gradient
    # gradients; sft for page, as DomLoRA's 32 supervised samples) | sft (gold solutions) | grpo
    # (one rollout and reward pass of the current policy: rl/placement_probe.py)
    probe_source: str = "auto"
    probe_engine: str = "hf"  # the GRPO probe's rollout engine: hf (in this process) | vllm
    probe_steps: int = 4  # probe batches for bmask (sign consistency) and gradrank
    probe_dtype: str = "float32"  # bfloat16 halves scoring memory; see placement.scoring.PROBE_DTYPES
    dropout: float = 0.0
    seed: int = 0

    def validate(self, p: str) -> None:
        _check(self.rank >= 1, f"{p}.rank", self.rank, "must be >= 1")
        _check(self.alpha > 0, f"{p}.alpha", self.alpha, "must be > 0")
        _one_of(f"{p}.alpha_policy", self.alpha_policy, ["fixed", "proportional", "rslora"])
        _check(len(self.target_modules) > 0, f"{p}.target_modules", self.target_modules,
               "name at least one module type")
        _check(self.top_k >= 1, f"{p}.top_k", self.top_k, "must be >= 1")
        _check(self.probe_samples >= 1, f"{p}.probe_samples", self.probe_samples, "must be >= 1")
        _one_of(f"{p}.probe_source", self.probe_source, ["auto", "sft", "grpo"])
        _one_of(f"{p}.probe_engine", self.probe_engine, ["hf", "vllm"])
        _check(self.probe_steps >= 1, f"{p}.probe_steps", self.probe_steps, "must be >= 1")
        _one_of(f"{p}.probe_dtype", self.probe_dtype, ["float32", "bfloat16"])
        _check(0 <= self.dropout < 1, f"{p}.dropout", self.dropout, "must be in [0, 1)")
        _check(not self.plan or Path(self.plan).expanduser().is_file(), f"{p}.plan", self.plan,
               "no such file; write a plan with `placerl score`, or leave it empty to score at start")
        if self.budget:
            kind, _, num = self.budget.partition("=")
            ok = kind in ("rank", "params", "fraction")
            try:
                ok = ok and float(num) > 0
            except ValueError:
                ok = False
            _check(ok, f"{p}.budget", self.budget, "'rank=N', 'params=N' or 'fraction=F' with a positive number")


@dataclass
class DiagnosticsConfig:
    enabled: bool = False
    every: int = 10  # capture gradients every k optimizer steps
    modules: list[str] = field(default_factory=lambda: ["down_proj", "v_proj"])  # name suffixes
    lags: int = 3  # cosine with the gradient 1..lags captures back
    window: int = 5  # captures in the sign-consistency window
    max_rank_dim: int = 256  # randomized SVD above this size

    def validate(self, p: str) -> None:
        _check(self.every >= 1, f"{p}.every", self.every, "must be >= 1")
        _check(self.lags >= 1, f"{p}.lags", self.lags, "must be >= 1")
        _check(self.window >= 2, f"{p}.window", self.window, "must be >= 2")


@dataclass
class LoggingConfig:
    output_dir: str = "runs"
    run_name: str = ""  # default: <recipe>-<timestamp>
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "placerl"
    progress: bool = True
    # false: placerl's lines and one progress bar; true: also vLLM's, Ray's and
    # transformers' records, actor output and progress bars (rl/console.py)
    verbose: bool = False


@dataclass
class ClusterConfig:
    address: str = ""  # "" uses $RAY_ADDRESS, else starts a local Ray on loopback
    num_cpus: int = 0  # for a local cluster; 0 = all
    object_store_mb: int = 1024
    colocate: bool = True  # rollout and learner share the same devices
    gpus_per_rollout_worker: float = 0.0
    gpus_per_learner_rank: float = 0.0
    # Threads of each CPU actor; 0: the host's cores shared among the actors of one kind
    # (rollout workers and learner ranks take turns, so each kind may use every core).
    cpu_threads: int = 0

    def validate(self, p: str) -> None:
        _check(self.cpu_threads >= 0, f"{p}.cpu_threads", self.cpu_threads, "must be >= 0 (0: automatic)")
        _check(self.object_store_mb >= 64, f"{p}.object_store_mb", self.object_store_mb, "must be >= 64")
        _check(self.gpus_per_rollout_worker >= 0, f"{p}.gpus_per_rollout_worker",
               self.gpus_per_rollout_worker, "must be >= 0")
        _check(self.gpus_per_learner_rank >= 0, f"{p}.gpus_per_learner_rank",
               self.gpus_per_learner_rank, "must be >= 0")


@dataclass
class TrainerConfig:
    steps: int = 50
    seed: int = 0
    eval_every: int = 0  # 0: evaluate only before and after training
    eval_size: int = 64  # problems per evaluation (greedy), the first of eval_split
    eval_split: str = "test"  # test | val (the data.val_size rows held out of training)
    save_every: int = 10
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto (newest complete checkpoint in the run dir) | never | <path>
    # Rollouts generated ahead of the learner: 0 alternates rollout and update (the policy that
    # samples is the one that learns); k > 0 launches step t+k's rollout before step t trains, so
    # rollout and learning overlap and a batch is at most k adapter versions old (rl/overlap.py).
    max_staleness: int = 0
    # 0: the learner gets each step's batch whole. k > 0: finished groups reach the learner k at
    # a time while the longest samples still decode (on-policy; vLLM stays awake, docs/async.md).
    stream_groups: int = 0

    def validate(self, p: str) -> None:
        _check(self.steps >= 1, f"{p}.steps", self.steps, "must be >= 1")
        _check(self.eval_every >= 0, f"{p}.eval_every", self.eval_every, "must be >= 0")
        _check(self.eval_size >= 0, f"{p}.eval_size", self.eval_size, "must be >= 0")
        _one_of(f"{p}.eval_split", self.eval_split, ["test", "val"])
        _check(self.save_every >= 1, f"{p}.save_every", self.save_every, "must be >= 1")
        _check(self.keep_checkpoints >= 1, f"{p}.keep_checkpoints", self.keep_checkpoints, "must be >= 1")
        _check(self.max_staleness >= 0, f"{p}.max_staleness", self.max_staleness,
               "must be >= 0 (0: synchronous rollout and update)")
        _check(self.stream_groups >= 0, f"{p}.stream_groups", self.stream_groups,
               "must be >= 0 (0: the learner gets each batch whole)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate(f.name)
        # Checked before scoring: vLLM cannot serve an adapter above its cap (an in-process
        # engine hangs on one). A scorer that sets ranks itself is checked again on its plan.
        _check(self.placement.plan or self.placement.rank <= self.rollout.max_lora_rank, "placement.rank",
               self.placement.rank, f"above rollout.max_lora_rank={self.rollout.max_lora_rank}; lower it or "
               "raise rollout.max_lora_rank")
        _check(self.trainer.max_staleness == 0 or self.algorithm.loss == "grpo", "trainer.max_staleness",
               self.trainer.max_staleness, "SFT has no rollouts to overlap; set trainer.max_staleness=0")
        self._check_streaming()
        ipc = self.rollout.weight_transfer == "cuda_ipc"  # the rest of its checks need the actors (device_handoff.py)
        _check(not ipc or self.rollout.weight_sync == "merged", "rollout.weight_transfer", "cuda_ipc",
               "hands over the adapter of merged weights only; set rollout.weight_sync=merged or weight_transfer=auto")
        _check(not ipc or self.trainer.max_staleness == 0, "rollout.weight_transfer", "cuda_ipc",
               "needs trainer.max_staleness=0 (the learner reuses its buffer); set weight_transfer=auto")
        _check(self.trainer.eval_split != "val" or self.data.val_size > 0, "trainer.eval_split",
               self.trainer.eval_split, "needs data.val_size > 0 (the rows held out of training)")
        return self

    def _check_streaming(self) -> None:
        """trainer.stream_groups learns a step in parts: one update, of a whole GRPO batch, on-policy."""
        if not self.trainer.stream_groups:
            return
        for field_name, value, ok, fix in (
                ("algorithm.loss", self.algorithm.loss, self.algorithm.loss == "grpo",
                 "SFT has no rollouts to stream; set trainer.stream_groups=0"),
                ("trainer.max_staleness", self.trainer.max_staleness, self.trainer.max_staleness == 0,
                 "streaming is on-policy; set trainer.max_staleness=0 or trainer.stream_groups=0"),
                ("learner.updates_per_batch", self.learner.updates_per_batch, self.learner.updates_per_batch == 1,
                 "later updates need the whole batch; set it to 1 or trainer.stream_groups=0"),
                ("learner.loss_token_cap", self.learner.loss_token_cap, self.learner.loss_token_cap == 0,
                 "the cap samples the whole batch's tokens; set it to 0 or trainer.stream_groups=0"),
                ("diagnostics.enabled", self.diagnostics.enabled, not self.diagnostics.enabled,
                 "gradient captures assume whole-batch normalised losses; set it to false or trainer.stream_groups=0"),
                ("rollout.sleep_mode", self.rollout.sleep_mode, self.rollout.sleep_mode is not True,
                 "the rollout decodes while the learner steps; set rollout.sleep_mode=auto or false")):
            _check(ok, field_name, value, f"cannot go with trainer.stream_groups={self.trainer.stream_groups}: {fix}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------- loading

def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a recipe, apply dotted overrides, coerce types and validate."""
    tree = merge(read_recipe(path) if path is not None else {}, parse_overrides(overrides))
    return build(Config, tree).validate()


def config_from_dict(tree: dict) -> Config:
    return build(Config, tree).validate()
