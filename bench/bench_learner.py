"""Learner step time: the FSDP2 learner against a plain one-process PEFT loop, and 1 vs N ranks.

    python -m bench.bench_learner                                   # CPU: tiny Llama, 1 and 2 gloo ranks
    python -m bench.bench_learner --model random-1024x16 --batch 32 --seq 512 --ranks 1,2   # GPUs

Ranks run as plain torch.multiprocessing processes (LearnerRank without Ray), so the
figures are the learner's own cost; through LearnerGroup, Ray adds one call per step.
Printed, all from this one run:
  overhead ratio  = learner step (1 rank) / plain PEFT loop step, same batch and math (goal <= 1.10)
  scaling ratio   = N-rank step / 1-rank step (same global batch)
  max |dLoRA|     = largest LoRA difference between 1 and N ranks after the same steps
  checkpoint      = state gathered to rank 0 and loaded on every rank restores the adapter exactly
The plain loop is what a user would write by hand: PEFT model, token logprobs, the GRPO
loss with old = current logprobs, backward per micro-batch, clip, AdamW (bf16 autocast on
CUDA where the learner uses FSDP2's bf16 mixed precision).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.multiprocessing as mp

from core.lora import DEFAULT_TARGET_MODULES
from rl.cluster import LOOPBACK, free_port

LORA = {"r": 16, "lora_alpha": 32, "target_modules": list(DEFAULT_TARGET_MODULES)}


# Qwen2.5-0.5B's shape (Qwen2.5-Coder-0.5B-Instruct's too), randomly initialised: a step's
# time does not depend on the weights' values, and this needs no download.
QWEN2_5_0_5B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                    tie_word_embeddings=True, rope_theta=1000000.0)


def build_model(spec: str, out_dir: str) -> str:
    """A local checkpoint folder: ``tiny-llama``, a folder, ``random-<hidden>x<layers>`` (a
    Llama), or ``random-qwen2.5-0.5b`` (Qwen2.5-0.5B's shape)."""
    if not spec.startswith("random-"):
        from core.models import resolve_model

        return resolve_model(spec)
    torch.manual_seed(0)
    if spec == "random-qwen2.5-0.5b":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        Qwen2ForCausalLM(Qwen2Config(**QWEN2_5_0_5B)).save_pretrained(out_dir)
        return out_dir
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers = (int(x) for x in spec.removeprefix("random-").split("x"))
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                      num_key_value_heads=max(1, hidden // 256), max_position_embeddings=4096)
    LlamaForCausalLM(cfg).save_pretrained(out_dir)
    return out_dir


def make_batch(B: int, T: int, prompt: int, vocab: int):
    from rl.learner.group import TrainBatch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    resp = torch.zeros(B, T)
    resp[:, prompt:] = 1
    return TrainBatch(ids, torch.ones(B, T, dtype=torch.long), resp, torch.randn(B, generator=g),
                      torch.zeros(B, T), max_tokens=T - prompt)


def make_cfg(path: str, n: int, mbs: int):
    from rl.config import config_from_dict

    return config_from_dict({"model": {"name": path}, "learner": {"num_ranks": n, "micro_batch_size": mbs,
                                                                  "lr": 1e-4},
                             "rollout": {"temperature": 1.0}, "trainer": {"steps": 1000}})


def _threads(n: int) -> None:
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rank_main(rank, n, port, path, mbs, batch, steps, queue):
    os.environ["CUDA_VISIBLE_DEVICES"] = os.environ.get("BENCH_GPUS", "0,1,2,3,4,5,6,7").split(",")[rank]
    import torch.distributed as dist

    from rl.learner.group import split_batch
    from rl.learner.rank import LearnerRank

    _threads(n)
    r = LearnerRank(rank, n)
    r.setup(make_cfg(path, n, mbs), path, LORA, None, LOOPBACK, port)
    shard = split_batch(batch, n)[rank]
    totals = {"num_sequences": batch.input_ids.shape[0], "num_tokens": float(batch.response_mask.sum()),
              "max_tokens": batch.max_tokens}
    r.train_step(shard, totals)  # warm-up: allocator, kernels, first all-gathers
    dist.barrier()
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        r.train_step(shard, totals)
    _sync()
    step_s = (time.perf_counter() - t0) / steps
    state = r.lora_state()
    # Checkpoint round trip: gather to rank 0, hand it to every rank, load, compare.
    full = r.state_for_save()
    ck = os.path.join(tempfile.gettempdir(), f"bench_learner_{port}.pt")
    if rank == 0:
        torch.save({"adapter": full["adapter"].tensors, "optimizer": full["optimizer"],
                    "scheduler": full["scheduler"], "counters": full["counters"]}, ck)
    dist.barrier()
    r.train_step(shard, totals)  # move away from the saved state, then restore it
    r.load_state(torch.load(ck, weights_only=False))
    restored = r.lora_state()
    ok = all(torch.equal(restored[k], state[k]) for k in state)
    dist.barrier()
    if rank == 0:
        os.remove(ck)
        # numpy pickles by value; a tensor would travel as a handle that dies with this process.
        queue.put({"step_s": step_s, "state": {k: v.float().numpy() for k, v in state.items()},
                   "checkpoint_ok": ok})
    r.shutdown()


def run_learner(n, path, mbs, batch, steps):
    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(i, n, port, path, mbs, batch, steps, queue)) for i in range(n)]
    for p in procs:
        p.start()
    out = queue.get()
    for p in procs:
        p.join()
    return out


def _plain_main(path, mbs, batch, steps, queue):
    os.environ["CUDA_VISIBLE_DEVICES"] = os.environ.get("BENCH_GPUS", "0").split(",")[0]
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    from rl.grpo import policy_loss, token_logprobs
    from core.models import load_model

    _threads(1)
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    model = load_model(path)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA)).to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.99))
    totals = dict(num_sequences=batch.input_ids.shape[0], num_tokens=float(batch.response_mask.sum()))

    def step():
        for s in range(0, batch.input_ids.shape[0], mbs):
            ids = batch.input_ids[s:s + mbs].to(dev)
            mask = batch.response_mask[s:s + mbs].to(dev)
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda):
                logits = model(input_ids=ids, attention_mask=batch.attention_mask[s:s + mbs].to(dev)).logits
            labels = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)
            lp = F.pad(token_logprobs(logits[:, :-1], labels), (1, 0))
            loss, _ = policy_loss(lp, lp.detach(), batch.advantages[s:s + mbs].to(dev), mask, **totals)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync()
    queue.put({"step_s": (time.perf_counter() - t0) / steps})


def run_plain(path, mbs, batch, steps):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_plain_main, args=(path, mbs, batch, steps, queue))
    p.start()
    out = queue.get()
    p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    ranks = [int(x) for x in args.ranks.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(args.model, tmp)
        from transformers import AutoConfig

        batch = make_batch(args.batch, args.seq, args.prompt, AutoConfig.from_pretrained(path).vocab_size)
        where = f"{torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else f"CPU x{os.cpu_count()}"
        print(f"model {args.model}  batch {args.batch}x{args.seq} (prompt {args.prompt})  "
              f"micro-batch {args.micro_batch}  LoRA r={LORA['r']} all linear  {where}")
        plain = run_plain(path, args.micro_batch, batch, args.steps)
        print(f"plain PEFT loop        step {plain['step_s']:.3f} s")
        res = {}
        for n in ranks:
            res[n] = run_learner(n, path, args.micro_batch, batch, args.steps)
            print(f"learner {n} rank(s)      step {res[n]['step_s']:.3f} s   checkpoint round trip "
                  f"{'exact' if res[n]['checkpoint_ok'] else 'MISMATCH'}")
    base = ranks[0]
    print(f"overhead ratio (learner {base} rank / plain loop): {res[base]['step_s'] / plain['step_s']:.3f}"
          "  (goal <= 1.10 at 1 rank)")
    for n in ranks[1:]:
        diff = max(float(abs(res[n]["state"][k] - res[base]["state"][k]).max()) for k in res[base]["state"])
        print(f"scaling ratio ({n} ranks / {base}): {res[n]['step_s'] / res[base]['step_s']:.3f}   "
              f"max |dLoRA| {n} vs {base} ranks: {diff:.2e}")


if __name__ == "__main__":
    main()
