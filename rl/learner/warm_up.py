"""Compiling the learner's decoder layers before the first step (``learner.compile``).

torch.compile builds its graphs on the first call of each kind: a training forward and
backward, and the no-grad forwards that some steps also run. Left to the steps, that compile
stalled the first one (82-137 s for Qwen2.5-0.5B's layers on one H200, reports/gpu/README.md
13.1), and any later micro-batch of a new kind. Here each rank runs those calls once on a small
synthetic micro-batch while the driver starts the rollout engines (rl/learner/group.py starts
it without waiting), so the two start-ups overlap, in part: with warm compile caches the
warm-up took 80 s, an eager run's whole start-up 71 s and a compiled run's 105 s (section 15.1).

The synthetic micro-batch is a few right-padded rows of random tokens, as every real one is, so
one graph serves them all: under ``learner.padding_mask=auto`` (or ``always``) compiled layers
take the attention mask in every micro-batch (one of rows of one length gets an empty column,
rl/learner/batching.py ``with_padding_column``, or transformers would drop its all-ones mask).
Under ``never`` none takes one; on one H200 the first real step then built two graphs more than
the warm-up had (reports/gpu/README.md 23; on the CPU it built none), and the rank's log names
the guard that failed. The warm-up used to run three kinds (padded rows, rows of one length, a
single row) and so built three. A micro-batch of a single row, where the
micro-batch holds more than one, still compiles a graph of its own the first time (torch.compile
specialises on a size of 1): token packing never leaves one in the recipes, and
``learner/compiled_graphs``, logged every step, shows it where it happens. The layers are
compiled with dynamic shapes (``dynamic=True``), so the graph built here serves every real
micro-batch: its rows and lengths are symbols, not constants. No two of the warm-up's sizes are
equal (torch.compile would assume they stay equal). The gradients are computed, reduced like a
step's last micro-batch (every rank takes part, so the collectives pair up) and then dropped; no
optimizer step is taken, so the run's updates are those of a run that never warmed up.
"""
from __future__ import annotations

import time

import torch

# Row lengths (after a 7-token prompt) of the micro-batch, as many rows as a micro-batch holds up
# to three. Small, so that the warm-up costs compiling, not computing.
PROMPT = 7
LENGTHS = (23, 21, 19)


def synthetic_shard(vocab_size: int, rows: int = len(LENGTHS), seed: int = 0) -> dict[str, torch.Tensor]:
    """A learner shard of ``rows`` (at most 3) right-padded rows of random tokens (pure)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(LENGTHS[:rows])
    T = int(lengths.max())
    cols = torch.arange(T)[None]
    attention_mask = (cols < lengths[:, None]).long()
    return {"input_ids": torch.randint(0, vocab_size, (rows, T), generator=g) * attention_mask,
            "attention_mask": attention_mask, "response_mask": attention_mask * (cols >= PROMPT),
            "advantages": torch.ones(rows), "rollout_logprobs": torch.zeros(rows, T)}


def warm_up(rank) -> dict[str, float]:
    """Run ``rank``'s (a rl.learner.rank.LearnerRank after setup) compiled layers once on a padded
    micro-batch for every kind of call its steps make, and drop the gradients; returns the seconds
    it took and the graphs torch.compile holds in this process."""
    from rl.learner.sharding import reshard

    t = time.perf_counter()
    cfg = rank.cfg
    grpo = cfg.algorithm.loss != "sft"
    temperature = cfg.rollout.temperature if grpo else 1.0
    rows = min(len(LENGTHS), cfg.learner.micro_batch_size)
    shard = synthetic_shard(rank.model.get_base_model().config.vocab_size, rows, seed=cfg.trainer.seed)
    for mb in rank._micro_batches(shard, "response_mask", [list(range(rows))]):
        if grpo and cfg.algorithm.kl_coef > 0:
            rank._reference(mb, temperature)  # the no-grad forward without the adapter
        if grpo and cfg.learner.updates_per_batch > 1 and rank._dropout:
            with torch.no_grad():
                rank.model.eval()
                rank._logprobs(mb, temperature)  # the no-grad forward of the old logprobs
        rank.model.train()
        rank.model.set_requires_gradient_sync(True)  # as on a step's last micro-batch: every rank reduces
        lp, entropy = rank._logprobs(mb, temperature, entropy=True)
        (lp.sum() + entropy).backward()
    rank.optimizer.zero_grad(set_to_none=True)
    if rank._keep_gathered:
        reshard(rank.model)  # as after an update: the next forward gathers the weights
    if rank.device.type == "cuda":
        # No empty_cache: a colocated vLLM engine may be sizing its KV cache from the device's
        # free memory right now, and it stops if that grows while it measures.
        torch.cuda.synchronize(rank.device)
    return {"warm_up_s": time.perf_counter() - t, "compiled_graphs": compiled_graphs()}


def compiled_graphs() -> float:
    """The graphs torch.compile has built in this process: a count that grows after the warm-up
    means a real micro-batch did not fit the warm-up's graphs and was compiled again."""
    from torch._dynamo.utils import counters

    return float(counters["stats"]["unique_graphs"])
