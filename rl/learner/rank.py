"""One rank of the learner: a PEFT LoRA model under FSDP2, its optimizer, and the step.

``LearnerGroup`` (rl/learner/group.py) runs one ``LearnerRank`` per Ray actor. Each rank joins
torch.distributed (gloo on CPU, NCCL on CUDA), loads the base model, wraps it with PEFT,
shards it with ``fully_shard`` per decoder layer and at the root, and then does the
per-step work on its share of the batch: forward, GRPO/SFT loss with the GLOBAL
normalisers (so the pieces' gradients sum to the full-batch gradient), accumulation
without communication until the last micro-batch, B-mask zeroing, clipping, AdamW.
With ``trainer.stream_groups`` a step arrives in parts as its groups finish generating:
``accumulate`` learns each part with summed losses, ``apply`` divides by the whole batch's
normalisers and updates. The adapter's export and checkpoint state are rl/learner/rank_state.py.

FSDP2 averages gradients over ranks by default; the divide factor is set to 1 because
the loss pieces are already normalised by the global token/sequence counts.

Diagnostics seam: ``attach(peft_model, cfg)`` (optional, picklable) runs on every rank
before ``fully_shard`` and returns callbacks ``fn(step) -> dict | None``. Module hooks
registered there survive sharding (the modules stay); Parameter objects do not
(fully_shard replaces them with DTensor parameters), so look parameters up by name
inside the callback. They are called on every rank after the last
backward of each update, before masking and clipping; collectives are allowed inside
them; rank 0's returned dicts are merged into the step metrics.

Left out: tensor/sequence parallelism, CPU offload, and a separate reference model
(the reference is this model with its adapters disabled).
"""
from __future__ import annotations

import math
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from core.lora import full_tensor
from placement import mask_b_gradients
from rl.cluster import LOOPBACK, free_port
from rl.grpo import batch_normaliser, configured_correction, policy_loss, sft_loss
from rl.learner.adapted_model import adapted_model
from rl.learner.batching import (in_row_order, plan_micro_batches, split_to_count, takes_padding_mask,
                                 with_padding_column)
from rl.learner.logprobs import chunkable, logits_token_logprobs, logprob_head
from rl.learner.optim import build_optimizer, build_scheduler
from rl.learner.profiling import profiled_step
from rl.learner.rank_state import RankState
from rl.learner.sharding import decoder_layers, reshard, shard_model
from rl.learner.shared_prefix import shared_prefix_logprobs, split_shared_prefixes
from rl.learner.warm_up import compiled_graphs, warm_up as warm_up_compiled

# policy_loss metrics that are token means over a micro-batch: summed weighted by tokens.
TOKEN_MEAN_METRICS = ("clip_fraction", "clip_low_fraction", "clip_high_fraction", "ratio_mean", "kl")


class LearnerRank(RankState):
    """One FSDP2 rank (a Ray actor body). Heavy setup happens in ``setup``."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.after_backward: list = []
        self.steps = 0  # train_step calls
        self.updates = 0  # optimizer steps taken (the schedule's clock)
        self._streamed: dict | None = None  # a streamed step's sums, from its first accumulate to apply

    # ------------------------------------------------------------------ setup

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def rendezvous_address(self, single_node: bool) -> tuple[str, int]:
        """Where the other ranks find this one (rank 0): loopback when the whole group is on
        this node, so torch.distributed listens on no external interface; else the node's IP."""
        import ray

        host = LOOPBACK if single_node else ray.util.get_node_ip_address()
        return host, free_port(host)

    def setup(self, cfg, model_path: str, lora_config: dict, b_masks, addr: str, port: int,
              attach=None, plan=None) -> None:
        """Join the process group, build the PEFT model, shard it with FSDP2, and build the optimizer."""
        self.cfg = cfg
        cuda = self._join_group(cfg, addr, port)
        peft_model, b_masks = adapted_model(cfg, model_path, lora_config, b_masks, plan)
        if attach is not None:
            self.after_backward = list(attach(peft_model, cfg) or [])
        if cfg.learner.compile:
            # A graph built after the warm-up (learner/compiled_graphs grows) names the guard
            # that failed, in this rank's log.
            torch._logging.set_logs(recompiles=True)
            # In place, before FSDP2 wraps them: names, hooks and checkpoints stay as they are.
            for layer in decoder_layers(peft_model.base_model.model):
                layer.compile(dynamic=True)
        shard_model(peft_model, self.device, self.world_size, cfg.learner.mixed_precision, cuda)
        self.model = peft_model
        self._chunkable = chunkable(peft_model.get_base_model())
        # See rl/learner/shared_prefix.py for why one rank and no checkpointing.
        self._share_prefix = (cfg.learner.shared_prefix and self.world_size == 1
                              and not cfg.learner.gradient_checkpointing)
        # Each layer's gathered (on CUDA, bf16) weights stay from the step's first forward until
        # _update reshards them: on one rank, where nothing is sharded, instead of a gather (a
        # cast and copy per weight) for every micro-batch; with shared prefixes, because each
        # layer runs backward twice per micro-batch (completions, then the prompt through the cache).
        self._keep_gathered = self.world_size == 1 or self._share_prefix
        if self._keep_gathered:
            peft_model.set_reshard_after_backward(False)
        self.b_masks = {k: v.bool() for k, v in b_masks.items()} if b_masks else None
        self.params = [p for p in peft_model.parameters() if p.requires_grad]
        lc = cfg.learner
        self.optimizer = build_optimizer(self.params, lr=lc.lr, betas=lc.betas, weight_decay=lc.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, warmup_steps=lc.warmup_steps,
                                         total_steps=cfg.trainer.steps * lc.updates_per_batch,
                                         schedule=lc.schedule, min_lr_ratio=lc.min_lr_ratio)
        self._dropout = getattr(peft_model.get_base_model().config, "attention_dropout", 0.0) > 0 or any(
            isinstance(m, torch.nn.Dropout) and m.p > 0 for m in peft_model.modules())
        # Beside a sleeping vLLM (cfg.rollout as the trainer resolved it): give the step's cached
        # activation blocks back, or vLLM wakes up beside them and the peak is learner + vLLM.
        self._release_cache = cuda and cfg.rollout.sleep_mode is True

    def warm_up(self) -> dict[str, float]:
        """With ``learner.compile``: build the compiled graphs now (rl/learner/warm_up.py)."""
        return warm_up_compiled(self)

    def _join_group(self, cfg, addr: str, port: int) -> bool:
        """Pick this rank's device and threads and join the process group; True on CUDA."""
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
            # cuDNN's attention builds an execution plan per new shape, and token-packed
            # micro-batches change shape every time: on an H200 its host time per call was ten
            # times its kernel's (reports/gpu/README.md section 12). PyTorch's own kernels take over.
            torch.backends.cuda.enable_cudnn_sdp(False)
        else:
            # Ray set one thread for this fractional-CPU actor; learner ranks compute while
            # the rollout workers wait, so they share the host's cores (rl/resources.py).
            from rl.resources import cpu_threads

            torch.set_num_threads(cpu_threads(cfg.cluster.cpu_threads, cfg.learner.num_ranks))
        if not cuda and addr == LOOPBACK:
            # Gloo binds its pair sockets to the address the hostname resolves to, which may be an
            # external interface even when the store is on loopback.
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo" if sys.platform.startswith("linux") else "lo0")
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://{addr}:{port}",
                                rank=self.rank, world_size=self.world_size, timeout=timedelta(minutes=30))
        return cuda

    # ------------------------------------------------------------------ forward

    def _plan(self, shard: dict) -> list[list[int]]:
        """Row indices of each micro-batch (rl/learner/batching.py); with a token budget, every
        rank runs as many micro-batches as the rank that needs most (FSDP2 collectives pair up)."""
        lc = self.cfg.learner
        plan = plan_micro_batches(shard, lc.micro_batch_size, lc.micro_batch_tokens, keep_groups=self._share_prefix)
        if lc.micro_batch_tokens and self.world_size > 1:
            count = torch.tensor([len(plan)], device=self.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            plan = split_to_count(plan, shard["attention_mask"].sum(dim=1).tolist(), int(count))
        return plan

    def _micro_batches(self, shard: dict, label_mask: str, plan: list[list[int]]) -> list[dict]:
        """The planned rows of each micro-batch, cut to its longest sequence (right padding)."""
        out = []
        for rows in plan:
            idx = torch.tensor(rows)
            mb = {k: v[idx] for k, v in shard.items()}
            T = max(int(mb["attention_mask"].sum(dim=1).max()), 2)
            mb = {k: (v[:, :T] if v.dim() == 2 else v) for k, v in mb.items()}
            masked = takes_padding_mask(self.cfg.learner.padding_mask, self.cfg.learner.compile, mb["attention_mask"])
            if self.cfg.learner.compile and masked:  # one compiled graph for every micro-batch
                mb = with_padding_column(mb)
            labelled = mb[label_mask][:, 1:].bool()
            mb["labels"] = torch.where(labelled, mb["input_ids"][:, 1:], -100)
            mb = {k: v.to(self.device) for k, v in mb.items()}
            # Counted here, on the host: read back from the device in the forward, each would
            # stall the launch queue until the GPU had caught up, once per micro-batch.
            columns = labelled.any(dim=0).nonzero()
            mb.update(num_tokens=float(shard["response_mask"][idx].sum()), num_labels=int(labelled.sum()),
                      first_label=int(columns[0]) if columns.numel() else 0,
                      model_mask=mb["attention_mask"] if masked else None)
            out.append(mb)
        return out

    def _logprobs(self, mb: dict, temperature: float, entropy: bool = False):
        """Per-token logprobs [b, t] (0 at position 0) and, if asked, the summed entropy over
        labelled tokens (the response tokens in training)."""
        def score(labels, **inputs):
            return self._score(labels, temperature, entropy, **inputs)

        if self._share_prefix:
            split = split_shared_prefixes(mb["input_ids"], mb["attention_mask"], mb["labels"])
            if split is not None:
                return shared_prefix_logprobs(self.model, split, mb["input_ids"].shape, score)
        # Positions from the first labelled one on: the prompt's positions get no loss, and
        # over a 49k vocabulary their logits were a third of a GSM8K micro-batch's lm_head compute.
        first = mb["first_label"]
        T = mb["input_ids"].shape[1]
        # The last kept position predicts nothing: label it -100.
        lp, ent = self._score(F.pad(mb["labels"][:, first:], (0, 1), value=-100), temperature, entropy,
                              mb["num_labels"], input_ids=mb["input_ids"], attention_mask=mb["model_mask"],
                              logits_to_keep=T - first)
        return F.pad(lp[:, :-1], (first + 1, 0)), ent

    def _score(self, labels, temperature: float, entropy: bool, num_labels: int | None = None, **inputs):
        """One forward over ``inputs``: the logprob of each kept position's label ([b, t], 0 where
        -100) and, if asked, the entropy summed over labelled positions (``num_labels`` of them,
        where known)."""
        chunk = self.cfg.learner.logprob_chunk
        if chunk and self._chunkable:
            with logprob_head(self.model, labels, temperature, chunk, entropy, num_labels):
                out = self.model(**inputs).logits
            return out[..., 0], (out[..., 1].detach().sum() if entropy else None)
        return logits_token_logprobs(self.model(**inputs).logits, labels, temperature, entropy)

    @torch.no_grad()
    def logprobs(self, shard: dict, temperature: float) -> torch.Tensor:
        self.model.eval()
        plan = self._plan(shard)
        mbs = self._micro_batches(shard, "attention_mask", plan)
        pieces = [self._logprobs(mb, temperature)[0].cpu() for mb in mbs]
        return in_row_order(pieces, plan, shard["input_ids"].shape[1])

    # ------------------------------------------------------------------ train

    def _loss(self, lp, mb: dict, totals: dict):
        a, mask = self.cfg.algorithm, mb["response_mask"]
        agg = dict(loss_agg=a.loss_agg, max_tokens=totals["max_tokens"],
                   num_sequences=totals["num_sequences"], num_tokens=totals["num_tokens"])
        if a.loss == "sft":
            return sft_loss(lp, mask, **agg), {}
        w = configured_correction(a, mb["old"], mb["rollout_logprobs"], mask)
        return policy_loss(lp, mb["old"], mb["advantages"], mask, epsilon_low=a.epsilon_low,
                           epsilon_high=a.epsilon_high, ref_logprobs=mb.get("ref"), kl_coef=a.kl_coef,
                           kl_estimator=a.kl_estimator, is_weights=w, **agg)

    @torch.no_grad()
    def _reference(self, mb: dict, temperature: float) -> torch.Tensor:
        self.model.eval()
        with self.model.disable_adapter():
            ref, _ = self._logprobs(mb, temperature)
        self.model.train()
        return ref

    def train_step(self, shard: dict, totals: dict) -> dict:
        with profiled_step(self.cfg.learner, self.steps + 1, self.rank, self.device):
            return self._train_step(shard, totals)

    def _train_step(self, shard: dict, totals: dict) -> dict:
        a, mu = self.cfg.algorithm, self.cfg.learner.updates_per_batch
        plan = self._plan(shard)
        mbs = self._micro_batches(shard, "response_mask", plan)
        if a.loss != "sft" and mu > 1 and self._dropout:
            # With dropout, pass 0's logprobs carry its dropout mask; old logprobs must not.
            with torch.no_grad():
                self.model.eval()
                for mb in mbs:
                    mb["old"] = self._logprobs(mb, self._temperature())[0]
        # The learning rate this step's first update uses (the scheduler moves after each update).
        lr = self.optimizer.param_groups[0]["lr"]
        sums, learner_lp, diag, norms, skipped = self._zero_sums(), [], {}, [], 0.0
        for u in range(mu):
            loss_sum, lps = self._backward_pass(mbs, totals, sums, first=(u == 0), share=1 / mu, sync_each=False)
            learner_lp += lps
            norm, skip, d = self._update(loss_sum)
            diag.update(d)
            norms.append(norm)
            skipped += skip
        out = self._step_out(sums, lr, norms, skipped, diag)
        out["learner_logprobs"] = in_row_order(learner_lp, plan, shard["input_ids"].shape[1]).cpu()
        return out

    def accumulate(self, shard: dict, max_tokens: int) -> torch.Tensor:
        """``trainer.stream_groups``: forward and backward over one part of a step's batch while
        the rest is still being generated; gradients add up until :meth:`apply`. The step's
        token and sequence counts are not known yet, so the loss is a plain sum here and apply
        divides the gradient by them (rl.grpo.batch_normaliser). Returns the part's pre-update
        logprobs, in row order."""
        if self._streamed is None:
            self._streamed = {"sums": self._zero_sums(), "lr": self.optimizer.param_groups[0]["lr"]}
        plan = self._plan(shard)
        mbs = self._micro_batches(shard, "response_mask", plan)
        summed = {"num_sequences": 1, "num_tokens": 1.0, "max_tokens": max_tokens}
        # Which micro-batch is the step's last is not known yet: every one reduces over the ranks.
        _, lps = self._backward_pass(mbs, summed, self._streamed["sums"], first=True, share=1.0, sync_each=True)
        return in_row_order(lps, plan, shard["input_ids"].shape[1]).cpu()

    def apply(self, totals: dict) -> dict:
        """The update after a streamed step's last :meth:`accumulate`: the summed gradient
        divided by the whole batch's normaliser, then masks, clipping and AdamW as any step."""
        if self._streamed is None:
            raise RuntimeError("LearnerRank.apply without accumulate: no part of this step was learned")
        streamed, self._streamed = self._streamed, None
        scale = 1.0 / batch_normaliser(self.cfg.algorithm.loss_agg, totals["num_tokens"], totals["num_sequences"])
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(scale)
        sums = streamed["sums"]
        sums["loss"], sums["pg_loss"] = sums["loss"] * scale, sums["pg_loss"] * scale
        norm, skipped, diag = self._update(sums["loss"])
        return self._step_out(sums, streamed["lr"], [norm], skipped, diag)

    def _temperature(self) -> float:
        return 1.0 if self.cfg.algorithm.loss == "sft" else self.cfg.rollout.temperature

    def _zero_sums(self) -> dict[str, torch.Tensor]:
        # Metrics stay on the device until the end: a .item() per micro-batch would stall the queue.
        zero = torch.zeros((), device=self.device)
        return {"loss": zero, "pg_loss": zero, "entropy_sum": zero, **{f"{k}_tok": zero for k in TOKEN_MEAN_METRICS}}

    def _backward_pass(self, mbs: list[dict], totals: dict, sums: dict, first: bool, share: float,
                       sync_each: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward and backward over ``mbs``, gradients accumulated, metrics added to ``sums``
        (weighted by ``share``, one over the updates per batch); the summed loss and, on the
        ``first`` pass over these micro-batches, their pre-update logprobs."""
        a, temperature = self.cfg.algorithm, self._temperature()
        self.model.train()
        loss_sum, learner_lp = torch.zeros((), device=self.device), []
        for i, mb in enumerate(mbs):
            self.model.set_requires_gradient_sync(sync_each or i == len(mbs) - 1)
            if a.loss != "sft" and a.kl_coef > 0 and "ref" not in mb:
                mb["ref"] = self._reference(mb, temperature)
            lp, ent = self._logprobs(mb, temperature, entropy=first)
            if first:
                # Before any update this model's logprobs ARE the old policy's: reuse them
                # instead of a separate no-grad pass (unless dropout made them noisy, _train_step).
                mb.setdefault("old", lp.detach())
                learner_lp.append(mb["old"])
                sums["entropy_sum"] = sums["entropy_sum"] + ent
            loss, m = self._loss(lp, mb, totals)
            loss.backward()
            loss_sum = loss_sum + loss.detach()
            sums["pg_loss"] = sums["pg_loss"] + m.get("pg_loss", loss.detach()) * share
            for k in TOKEN_MEAN_METRICS:
                if k in m:
                    sums[f"{k}_tok"] = sums[f"{k}_tok"] + m[k] * mb["num_tokens"] * share
        sums["loss"] = sums["loss"] + loss_sum * share
        return loss_sum, learner_lp

    def _step_out(self, sums: dict, lr: float, norms: list[float], skipped: float, diag: dict) -> dict:
        """A step's metrics as train_step and apply return them (the step counted here)."""
        self.steps += 1
        if self.cfg.learner.compile:
            diag["compiled_graphs"] = compiled_graphs()
        if self._release_cache:
            torch.cuda.empty_cache()
        finite = [g for g in norms if math.isfinite(g)]
        out = {k: float(v) for k, v in sums.items()}
        out.update(lr=lr, skipped=skipped, grad_norm=sum(finite) / len(finite) if finite else norms[-1],
                   diagnostics=diag if self.rank == 0 else {})
        return out

    def _update(self, local_loss: torch.Tensor) -> tuple[float, float, dict]:
        """Mask, clip and step; a non-finite loss on any rank or grad norm skips the step."""
        diag = {}
        if self._keep_gathered:
            # Register the sharded parameters again (they hold the gradients that hooks, masks
            # and the optimizer read) and let the next forward gather the updated weights.
            reshard(self.model)
        for fn in self.after_backward:
            diag.update(fn(self.steps) or {})
        if self.b_masks:
            mask_b_gradients(self.model, self.b_masks)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.learner.max_grad_norm)
        bad = (~torch.isfinite(local_loss.reshape(1))).float()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        norm = float(full_tensor(norm))
        skipped = bool(bad.item()) or not math.isfinite(norm)
        if not skipped:
            self.optimizer.step()
            self.scheduler.step()
            self.updates += 1
        self.optimizer.zero_grad(set_to_none=True)
        return norm, float(skipped), diag

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
