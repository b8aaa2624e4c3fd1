"""The learner as a group of Ray actors: N FSDP2 ranks training one PEFT LoRA adapter.

The driver talks to :class:`LearnerGroup` only; each rank's work lives in
rl/learner/rank.py. A step splits the batch into N equal shards of sequences, every
rank runs its micro-batches, and the group combines the ranks' metrics. The rollout
vs learner log-probability mismatch is computed here on the whole batch (the ranks
return their pre-update log-probabilities), so it is exact whatever the split.

Uneven batches: when B % N != 0 the batch is padded to a multiple of N with copies of
its last row whose response mask is zero. They cost compute but add nothing to the
loss or the gradient, and the loss normalisers count only the real sequences and
tokens; FSDP2 needs every rank to run the same number of forward/backward passes.

Checkpoints are written and read by this (driver) process from state gathered on rank
0, so the checkpoint folder need not be visible to the actors' nodes.

Left out: elastic membership (a dead rank ends the group; the driver restarts it from
a checkpoint), and pipelining of steps.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from rl.learner.token_cap import cap_batch_loss_tokens


@dataclass
class TrainBatch:
    """CPU tensors; sequences are prompt + completion, RIGHT-padded."""

    input_ids: Tensor  # [B, T] long
    attention_mask: Tensor  # [B, T]
    response_mask: Tensor  # [B, T] 1 on completion tokens that get loss (labels are input_ids shifted)
    advantages: Tensor  # [B] float (ignored for SFT)
    rollout_logprobs: Tensor  # [B, T] rollout engine's per-token logprobs on completion tokens, 0 elsewhere
    max_tokens: int  # rollout.max_new_tokens (for seq-mean-token-sum-norm)

    def validate(self) -> None:
        B, T = self.input_ids.shape
        for name in ("attention_mask", "response_mask", "rollout_logprobs"):
            if tuple(getattr(self, name).shape) != (B, T):
                raise ValueError(f"TrainBatch.{name} has shape {tuple(getattr(self, name).shape)}, "
                                 f"expected [B, T]=[{B}, {T}] like input_ids")
        if tuple(self.advantages.shape) != (B,):
            raise ValueError(f"TrainBatch.advantages has shape {tuple(self.advantages.shape)}, expected [{B}]")
        if T < 2 or bool(self.response_mask[:, 0].any()):
            raise ValueError("TrainBatch.response_mask is set at position 0; the first token has no "
                             "prediction, every sequence needs a prompt of at least one token")
        if bool(((self.response_mask != 0) & (self.attention_mask == 0)).any()):
            raise ValueError("TrainBatch.response_mask marks padding (attention_mask=0) tokens; "
                             "mask only real completion tokens")


_FIELDS = ("input_ids", "attention_mask", "response_mask", "advantages", "rollout_logprobs")


def split_batch(batch: TrainBatch, n: int) -> list[dict[str, Tensor]]:
    """N shards of equal size, padded with zero-loss copies of the last row (see module doc)."""
    B = batch.input_ids.shape[0]
    per = -(-B // n)
    tensors = {k: getattr(batch, k) for k in _FIELDS}
    pad = per * n - B
    if pad:
        idx = torch.cat([torch.arange(B), torch.full((pad,), B - 1)])
        tensors = {k: v[idx].clone() for k, v in tensors.items()}
        tensors["response_mask"][B:] = 0
        tensors["advantages"][B:] = 0
    return [{k: v[r * per:(r + 1) * per].contiguous() for k, v in tensors.items()} for r in range(n)]


def cat_columns(tensors: list[Tensor]) -> Tensor:
    """[b_i, t_i] tensors stacked by rows, each right-padded with zeros to the longest t (pure)."""
    T = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, T - t.shape[1])) for t in tensors])


def concat_batches(batches: list[TrainBatch]) -> TrainBatch:
    """One TrainBatch of several parts' rows, in order, right-padded to the longest (pure); the
    padding is 0 everywhere (ids included: masked out of attention, as any padding)."""
    def cat(name: str) -> Tensor:
        return cat_columns([getattr(b, name) for b in batches])

    return TrainBatch(cat("input_ids"), cat("attention_mask"), cat("response_mask"),
                      torch.cat([b.advantages for b in batches]), cat("rollout_logprobs"), batches[0].max_tokens)


def combine_metrics(outs: list[dict], num_tokens: float, algorithm_loss: str, kl_on: bool) -> dict[str, float]:
    """Rank results -> step metrics: globally normalised losses add up, token-weighted
    metrics are divided by the batch's tokens, replicated values come from rank 0."""
    from rl.learner.rank import TOKEN_MEAN_METRICS

    tok = max(num_tokens, 1.0)
    m = {"loss": sum(o["loss"] for o in outs), "grad_norm": outs[0]["grad_norm"], "lr": outs[0]["lr"],
         "skipped": outs[0]["skipped"], "entropy": sum(o["entropy_sum"] for o in outs) / tok,
         "tokens": float(num_tokens)}
    if algorithm_loss != "sft":
        m["pg_loss"] = sum(o["pg_loss"] for o in outs)
        for k in TOKEN_MEAN_METRICS:
            if k != "kl" or kl_on:
                m[k] = sum(o[f"{k}_tok"] for o in outs) / tok
    m.update({k: float(v) for k, v in outs[0]["diagnostics"].items()})
    return m


class LearnerDied(RuntimeError):
    """A learner rank's process is gone (killed, out of memory, its node lost); the group
    cannot go on without it, and the run resumes from its last complete checkpoint."""


def _wait_all(refs: list, on_error) -> list:
    """ray.get that fails fast: the first failing rank's error is raised at once (the
    others would wait in a collective forever), after ``on_error`` tears the group down.
    A rank whose process died raises :class:`LearnerDied` naming it."""
    import ray
    from ray.exceptions import RayActorError

    pending, index = list(refs), {r: i for i, r in enumerate(refs)}
    results = [None] * len(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            results[index[ready[0]]] = ray.get(ready[0])
        except RayActorError as e:
            on_error()
            cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LearnerDied(f"learner rank {index[ready[0]]} died ({cause})") from e
        except Exception:
            on_error()
            raise
    return results


class LearnerGroup:
    """N learner ranks (Ray actors) that act as one FSDP2 data-parallel learner."""

    def __init__(self, cfg, model_path: str, lora_config: dict, b_masks: dict[str, Tensor] | None = None,
                 placement_group=None, bundle_offset: int = 0, attach=None, plan=None):
        """``b_masks``: lora_B parameter name -> bool mask (True trains), as PlacementPlan.b_masks().
        ``plan``: a placement.PlacementPlan; when given the model is built by placement.apply_plan
        (the plan's seeded A, verified shapes and scales) and its masks are used.
        ``attach``: the diagnostics seam, see rl/learner/rank.py."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from rl.learner.rank import LearnerRank

        self.cfg, self.n = cfg, cfg.learner.num_ranks
        self._warming, self.warm_up_report = [], {}  # the compile warm-up: references, then its report
        from rl.console import actor_env

        opts = {"num_gpus": cfg.cluster.gpus_per_learner_rank, "num_cpus": 1}
        if actor_env(cfg.logging.verbose):
            opts["runtime_env"] = actor_env(cfg.logging.verbose)
        actor = ray.remote(LearnerRank)
        self.ranks = []
        for i in range(self.n):
            o = dict(opts)
            if placement_group is not None:
                # A colocated rollout worker shares the bundle's single CPU (rl/resources.py).
                o["num_cpus"] = 0.5 if cfg.cluster.colocate else 1
                o["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group, placement_group_bundle_index=bundle_offset + i)
            self.ranks.append(actor.options(**o).remote(i, self.n))
        single_node = len(set(self._call("node_id"))) == 1
        addr, port = self._all([self.ranks[0].rendezvous_address.remote(single_node)])[0]
        masks = ray.put({k: v.cpu() for k, v in b_masks.items()}) if b_masks else None
        self._all([r.setup.remote(cfg, model_path, lora_config, masks, addr, port, attach, plan) for r in self.ranks])
        # Compiled layers build their graphs now, while the driver goes on to start the rollout
        # engines (rl/learner/warm_up.py); the first call that needs the ranks waits for it.
        self._warming = [r.warm_up.remote() for r in self.ranks] if cfg.learner.compile else []

    def ready(self) -> dict[str, float]:
        """Wait for the ranks' compile warm-up, if one is running; its report (rank 0's seconds
        and compiled graphs), or {} without ``learner.compile``."""
        warming, self._warming = self._warming, []
        if warming:
            self.warm_up_report = _wait_all(warming, self._kill)[0]
        return self.warm_up_report

    def _all(self, refs: list) -> list:
        self.ready()  # a warm-up error surfaces here, not as a later call's
        return _wait_all(refs, self._kill)

    def _call(self, method: str, *args) -> list:
        return self._all([getattr(r, method).remote(*args) for r in self.ranks])

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        t0 = time.perf_counter()
        batch.validate()
        a, cap = self.cfg.algorithm, self.cfg.learner.loss_token_cap
        # Here, before the split, so that it holds for SFT and GRPO alike and whatever the ranks:
        # regime experiments compare at equal loss tokens per step (rl/learner/token_cap.py).
        batch, capped = cap_batch_loss_tokens(batch, cap)
        num_tokens = float(batch.response_mask.sum())
        totals = {"num_sequences": batch.input_ids.shape[0], "num_tokens": max(num_tokens, 1.0),
                  "max_tokens": batch.max_tokens}
        shards = split_batch(batch, self.n)
        outs = self._all([r.train_step.remote(s, totals) for r, s in zip(self.ranks, shards)])
        learner_lp = torch.cat([o["learner_logprobs"] for o in outs])[: batch.input_ids.shape[0]]
        m = self._step_metrics(batch, outs, learner_lp, num_tokens)
        if cap:
            m["capped_tokens"] = float(capped)
        m["time_s"] = time.perf_counter() - t0
        return m

    def accumulate(self, part: TrainBatch) -> list:
        """``trainer.stream_groups``: learn one part of a step's batch (rl/learner/rank.py
        accumulate); returns at once, with the ranks' references for :meth:`apply`."""
        part.validate()
        self.ready()
        return [r.accumulate.remote(s, part.max_tokens) for r, s in zip(self.ranks, split_batch(part, self.n))]

    def apply(self, parts: list[tuple[TrainBatch, list]]) -> dict[str, float]:
        """The update after a streamed step's parts, ``(part, accumulate's references)`` in the
        order they were sent; the step's metrics, as train_step's, over the whole batch."""
        if not parts:
            raise RuntimeError("LearnerGroup.apply without accumulate: no part of this step was learned")
        t0 = time.perf_counter()
        learner_lp = cat_columns([torch.cat(self._all(refs))[: part.input_ids.shape[0]] for part, refs in parts])
        batch = concat_batches([part for part, _ in parts])
        num_tokens = float(batch.response_mask.sum())
        totals = {"num_sequences": batch.input_ids.shape[0], "num_tokens": max(num_tokens, 1.0)}
        m = self._step_metrics(batch, self._call("apply", totals), learner_lp, num_tokens)
        m["time_s"] = time.perf_counter() - t0
        return m

    def _step_metrics(self, batch: TrainBatch, outs: list[dict], learner_lp: Tensor,
                      num_tokens: float) -> dict[str, float]:
        """The ranks' results combined, and the rollout/learner mismatch over the whole batch."""
        a = self.cfg.algorithm
        m = combine_metrics(outs, num_tokens, a.loss, a.kl_coef > 0)
        if a.loss != "sft":
            from rl.grpo import configured_correction, logprob_mismatch, masked_fractions

            mm = logprob_mismatch(learner_lp, batch.rollout_logprobs, batch.response_mask)
            m.update({f"logprob_mismatch_{k}": float(v) for k, v in mm.items()})
            # What the importance correction dropped (the ranks apply the same weights to their shards).
            w = configured_correction(a, learner_lp, batch.rollout_logprobs, batch.response_mask)
            m.update({f"is_{k}": float(v) for k, v in masked_fractions(w, batch.response_mask).items()})
        return m

    def logprobs(self, batch: TrainBatch, temperature: float | None = None) -> Tensor:
        """Teacher-forced per-token logprobs [B, T] (0 at position 0 and on padding)."""
        batch.validate()
        t = self.cfg.rollout.temperature if temperature is None else temperature
        rows = self._all([r.logprobs.remote(s, t) for r, s in zip(self.ranks, split_batch(batch, self.n))])
        return torch.cat(rows)[: batch.input_ids.shape[0]]

    def export_adapter(self, version: int, serve_dtype: str | None = None, on_device: bool = False):
        """ObjectRef of an rl.rollout.sync.AdapterPayload (every rank gathers, rank 0 returns it);
        ``serve_dtype`` and ``on_device`` as in LearnerRank.export_adapter (rl.rollout.engine.payload_dtype)."""
        refs = [r.export_adapter.remote(version, serve_dtype, on_device) for r in self.ranks]
        self._all(refs[1:])
        return refs[0]

    def gpu_uuid(self) -> str | None:
        """Rank 0's GPU (the one an exported adapter is on); None on CPU."""
        return self._all([self.ranks[0].gpu_uuid.remote()])[0]

    def lora_state(self) -> dict[str, Tensor]:
        """Full LoRA tensors under the live model's parameter names (for tests and tools)."""
        return self._call("lora_state")[0]

    def save(self, directory: str) -> None:
        """Adapter (PEFT format), full optimizer and scheduler state, written into ``directory``."""
        from rl.rollout.sync import write_peft_adapter

        state = self._call("state_for_save")[0]
        os.makedirs(directory, exist_ok=True)
        write_peft_adapter(state["adapter"], directory)
        torch.save(state["optimizer"], os.path.join(directory, "optimizer.pt"))
        torch.save(state["scheduler"], os.path.join(directory, "scheduler.pt"))
        with open(os.path.join(directory, "learner_state.json"), "w") as f:
            json.dump(state["counters"], f)

    def load(self, directory: str) -> None:
        """Restore adapter, optimizer and scheduler on every rank (any saved world size)."""
        import ray
        from safetensors.torch import load_file

        names = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "learner_state.json")
        missing = [n for n in names if not os.path.exists(os.path.join(directory, n))]
        if missing:
            raise FileNotFoundError(f"learner checkpoint {directory!r} lacks {missing}; "
                                    "it is incomplete, resume from an earlier checkpoint")
        with open(os.path.join(directory, "learner_state.json")) as f:
            counters = json.load(f)
        state = ray.put({"adapter": load_file(os.path.join(directory, "adapter_model.safetensors")),
                         "optimizer": torch.load(os.path.join(directory, "optimizer.pt"), weights_only=True),
                         "scheduler": torch.load(os.path.join(directory, "scheduler.pt"), weights_only=True),
                         "counters": counters})
        self._call("load_state", state)

    def shutdown(self) -> None:
        import ray

        if self.ranks:
            try:
                ray.get([r.shutdown.remote() for r in self.ranks], timeout=30)
            except Exception:  # a dead or hung rank must not stop the others being killed
                pass
        self._kill()

    def _kill(self) -> None:
        import ray

        ranks, self.ranks = getattr(self, "ranks", []), []
        for r in ranks:
            ray.kill(r)
