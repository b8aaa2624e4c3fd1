"""The GRPO driver: a single controller that wires actors together, top to bottom.

One step::

    prompts --(RolloutPool: vLLM actors, current adapter)--> G completions per prompt
            --(RewardRunner: isolated, timed-out reward functions)--> rewards
            --(grpo.group_advantages)--> advantages --(batch.grpo_batch)--> TrainBatch
            --(LearnerGroup: FSDP2 ranks, PEFT LoRA)--> one optimizer update
            --(export_adapter -> Ray object store, or CUDA IPC on a shared GPU -> load_adapter)--> rollout workers

With ``algorithm.loss=sft`` the rollout and reward stages are replaced by the gold
solutions, so SFT and GRPO differ only in the loss (the regime contrast needs that).

By default (``trainer.max_staleness=0``) rollout and update alternate, so the policy that
samples is the one that learns, up to the logprob mismatch measured every step. With
``max_staleness=k > 0`` the rollouts of the next k steps are launched before a step trains
(rl/rollout/overlap.py), so they overlap learning and are up to k adapter versions old; the
staleness is logged every step and ``algorithm.is_correction`` weighs the gap. With
``trainer.stream_groups=k`` groups reach the learner k at a time as they finish, on-policy (docs/async.md).

Left out on purpose: generation-time reward shaping beyond what the reward library does,
and multi-turn / tool-use rollouts.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
import time
from pathlib import Path

import torch

from rl import checkpoint as ckpt
from rl.learner.batch import sft_batch
from rl.learner.group import LearnerDied
from rl.config import Config
from rl.console import actor_env, progress_fields
from rl.data import PromptSampler, attach_prompts, load_task
from rl.evaluate import accuracy, eval_runner, graded
from rl.metrics_log import MetricsLog
from core.models import load_tokenizer, resolve_model
from rl.rollout.engine import payload_dtype, served_config
from rl.rollout.pool import sync_metrics
from rl.startup import make_plan, rollout_settings

log = logging.getLogger("placerl")
EVAL_PROBLEMS_FILE = "eval_problems.json"  # the final evaluation, 0/1 per test problem (strict, flexible)


def run_dir_for(cfg: Config, recipe: str = "run") -> Path:
    name = cfg.logging.run_name or f"{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.logging.output_dir) / name


class StartupError(ValueError):
    """A run's inputs are wrong (config, data, model, plan, rewards, run folder); found before
    Ray or any actor starts, and said in one line."""


# What a bad input raises while a run is prepared (rewards.RewardError and the config and
# data errors are ValueErrors too).
_INPUT_ERRORS = (ValueError, FileNotFoundError, ckpt.RunInUse)


class Trainer:
    """Owns the actors of one run and the loop that drives them."""

    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.lock = self.learner = self.rollout = self.rollouts = self.layout = self.metrics = None
        self.startup: dict[str, float] = {}
        self.rewards = self.eval_rewards = None
        try:
            self._prepare()
        except _INPUT_ERRORS as e:
            self.close()
            raise StartupError(str(e)) from e
        try:
            self._start_actors()
        except BaseException:
            # Give back what was reserved: a caller in the same Ray (compare, a notebook, a
            # test) must not find the bundles or half-started actors still held.
            self.close()
            raise
        self.step, self.adapter_version, self.wake_s = 0, 0, 0.0
        self.eval_problems: dict[str, list[float]] = {}  # the last evaluation, problem by problem
        # Dataset rows trained at each step (1-based): a resume must neither skip nor repeat one.
        self.trained_prompts: dict[int, list[int]] = {}

    def _prepare(self) -> None:
        """Everything that can reject the run's inputs, before Ray or any actor starts."""
        from rewards import RewardRunner

        cfg, run_dir = self.cfg, self.run_dir
        self.served = rollout_settings(cfg, self._rollout_dtype())
        self.lock = ckpt.RunLock(run_dir)
        cfg.save(run_dir / "config.yaml")
        torch.manual_seed(cfg.trainer.seed)
        self.rewards = RewardRunner.from_config(cfg.reward, group_size=cfg.rollout.group_size)
        self.eval_rewards = eval_runner(cfg.reward.timeout_s)
        self.model_path = resolve_model(cfg.model.name, cfg.model.cache_dir)
        self.tok = load_tokenizer(self.model_path)
        self.train_rows = attach_prompts(load_task(cfg.data, "train"), self.tok, cfg.data)
        # Evaluated during training (trainer.eval_split): the test set, or the val rows held out of training.
        self.test_rows = attach_prompts(load_task(cfg.data, cfg.trainer.eval_split), self.tok,
                                        cfg.data)[: cfg.trainer.eval_size]
        self.sampler = PromptSampler(len(self.train_rows), seed=cfg.data.seed)
        self.plan, self.lora_dict = make_plan(cfg, self.model_path, self.train_rows)
        self.plan.save(run_dir / "plan.json")

    def _start_actors(self) -> None:
        from rl.cluster import init_ray
        from rl.learner.group import LearnerGroup
        from rl.resources import reserve
        from rl.rollout.device_handoff import adapter_stays_on_gpu
        from rl.rollout.overlap import RolloutQueue
        from rl.rollout.pool import RolloutPool

        cfg, started = self.cfg, time.perf_counter()
        on_sigterm = signal.getsignal(signal.SIGTERM)
        log.info("%s: %d train and %d test prompts; starting %d learner rank(s) and %d rollout worker(s)",
                 cfg.model.name, len(self.train_rows), len(self.test_rows), cfg.learner.num_ranks, cfg.rollout.num_workers)
        init_ray(cfg.cluster.address, max(cfg.cluster.num_cpus, cfg.learner.num_ranks + cfg.rollout.num_workers + 1),
                 cfg.cluster.object_store_mb, verbose=cfg.logging.verbose)
        if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
            # ray.init puts a native SIGTERM handler in front of the entry point's (launch.train's),
            # and that one aborts the process without unwinding: put the entry point's back, so that
            # a stopped job discards a checkpoint in progress and releases what it holds.
            signal.signal(signal.SIGTERM, on_sigterm)
        self.layout = layout = reserve(cfg)
        # The plan builds the PEFT model itself (seeded A, verified shapes, B masks); the
        # diagnostics hooks go on before FSDP2 wraps it.
        attach = None
        if cfg.diagnostics.enabled:
            from rl.diagnostics.capture import attach_to_learner as attach
        # The learner sees the rollout settings as resolved for this host (sleep mode decides
        # whether it hands its cached memory back after each step), and where a profile goes.
        learner_cfg = cfg.learner
        if learner_cfg.profile_step and not learner_cfg.profile_dir:
            learner_cfg = dataclasses.replace(learner_cfg, profile_dir=str(self.run_dir / "profile"))
        self.learner = LearnerGroup(dataclasses.replace(cfg, rollout=self.served, learner=learner_cfg),
                                    self.model_path, self.lora_dict, plan=self.plan, attach=attach,
                                    placement_group=layout.placement_group)
        needs_rollout = cfg.algorithm.loss == "grpo" or cfg.trainer.eval_size > 0
        # The plan never changes during a run: serve at its largest rank (rl/rollout/engine.py says why).
        served = served_config(self.served, self.plan.max_rank())
        self.rollout = RolloutPool(served, self.model_path, self._rollout_dtype(), cfg.trainer.seed,
                                   layout, cfg.cluster, actor_env(cfg.logging.verbose)) if needs_rollout else None
        # How each version travels: its dtype, and whether it stays on the GPU (rollout.weight_transfer).
        self.export_as = (payload_dtype(self.served, self._rollout_dtype()),
                          adapter_stays_on_gpu(served, cfg.trainer.max_staleness, self.learner, self.rollout))
        if cfg.algorithm.loss == "grpo":
            self.rollouts = RolloutQueue(self.rollout, self.sampler, [r["prompt_ids"] for r in self.train_rows],
                                         cfg.rollout.prompts_per_step, self._sampling, cfg.trainer.max_staleness,
                                         cfg.trainer.steps)
        # With learner.compile the ranks have been compiling since the LearnerGroup started:
        # through the rollout engines' start-up, and now until they are done.
        warm = {f"learner/{k}": v for k, v in self.learner.ready().items()}
        # Reported with the first step this process takes (a resumed run starts up again).
        self.startup = {"time/startup_s": time.perf_counter() - started, **warm}
        self.metrics = MetricsLog(self.run_dir, cfg.logging, cfg.to_dict())

    def _rollout_dtype(self) -> str:
        from rl.rollout.engine import rollout_dtype

        return rollout_dtype(self.cfg)

    # ------------------------------------------------------------------ state

    def resume(self) -> bool:
        path = ckpt.resolve_resume(self.cfg.trainer.resume, self.run_dir)
        if path is None:
            return False
        state = ckpt.load_driver_state(path)
        self.learner.load(str(Path(path) / "learner"))
        self.sampler.load_state_dict(state["sampler"])
        self.step, self.adapter_version = state["step"], state["adapter_version"]
        self.metrics.rewind(self.step)
        if state["rng"] is not None:
            ckpt.set_rng_state(state["rng"])
        self._sync()
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def save(self) -> Path:
        # A batch in flight is not saved: the sampler goes back to before its prompts were drawn.
        sampler = self.rollouts.sampler_state() if self.rollouts is not None else self.sampler.state_dict()
        state = {"sampler": sampler, "adapter_version": self.adapter_version}
        return ckpt.save_checkpoint(self.run_dir, self.step, state, self.learner.save,
                                    keep=self.cfg.trainer.keep_checkpoints)

    def _sync(self) -> dict[str, float]:
        """Serve the learner's adapter on the rollout workers; ``time/sync_s``, per stage (rl/rollout/worker.py
        load_adapter) ``time/sync_<stage>_s``, and served merged, ``rollout/merged_update_error``."""
        if self.rollout is None:
            return {}
        overlapped = self.cfg.trainer.max_staleness > 0
        self.adapter_version += 1
        # Asked for first: gathered while the rollout wakes, so only what outlasts the wake is in time/sync_s.
        ref = self.learner.export_adapter(self.adapter_version, *self.export_as)
        t = time.perf_counter()
        if not overlapped:  # an overlapped rollout never sleeps (check_overlap)
            self.rollout.wake_up()
        self.wake_s = time.perf_counter() - t
        t = time.perf_counter()
        # Overlapped: queued behind the rollouts in flight, which keep their older adapter (no stages then).
        stages = self.rollout.sync(ref, wait=not overlapped)
        return {"time/sync_s": time.perf_counter() - t, **sync_metrics(stages)}

    # ------------------------------------------------------------------ phases

    def _sampling(self, step: int = 1, greedy: bool = False):
        """Step ``step``'s (1-based) sampling settings; its seed is the step's, whenever it is launched."""
        from rl.rollout.engine import SamplingSpec, step_seed

        r = self.cfg.rollout
        if greedy:
            return SamplingSpec(n=1, max_new_tokens=r.eval_max_new_tokens, temperature=0.0)
        return SamplingSpec(n=r.group_size, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                            top_p=r.top_p, seed=step_seed(self.cfg.trainer.seed, step - 1))

    def evaluate(self) -> dict[str, float]:
        if not self.test_rows or self.rollout is None:
            return {}
        groups = self.rollout.generate([r["prompt_ids"] for r in self.test_rows], self._sampling(greedy=True))
        texts = [g[0].text for g in groups]
        # Kept per problem: placements are compared problem by problem (paired) on the same test rows.
        self.eval_problems = graded(self.test_rows, texts, self.eval_rewards)
        return accuracy(self.test_rows, texts, self.eval_rewards, self.eval_problems)

    def grpo_step(self, batch) -> dict[str, float]:
        """One update on a collected rl.rollout.overlap.Batch (unless it is too stale or all flat)."""
        from rl.rollout.overlap import admit, staleness
        from rl.step_scoring import score_groups, step_metrics

        cfg = self.cfg
        m = {"rollout/staleness": float(staleness(self.adapter_version, batch.versions)),
             "rollout/in_flight": float(self.rollouts.in_flight()), "time/rollout_wait_s": batch.wait_s}
        if not admit(self.adapter_version, batch.versions, cfg.trainer.max_staleness):
            m["rollout/stale_batch_skipped"] = 1.0  # never trained on; its prompts are spent
            return m
        # The learner gets the rollout's accelerator memory (sleep mode). The workers fall asleep
        # while the rewards are scored, and the learner starts once they are: time/sleep_s is
        # the wait beyond the rewards. Overlapped, a sleep would wait for the rollouts in flight.
        asleep = self.rollout.sleep(wait=False) if not cfg.trainer.max_staleness else []
        t1 = time.perf_counter()
        scored = score_groups(cfg, self.rewards, self.tok.pad_token_id, [self.train_rows[i] for i in batch.indices],
                              batch.groups)
        t2 = time.perf_counter()
        self.rollout.finish(asleep)
        m["time/sleep_s"] = time.perf_counter() - t2
        m.update(step_metrics([scored], batch.rollout_s, getattr(batch.groups, "call_s", {}), t2 - t1))
        if scored.train_batch is None:  # every group was flat: nothing to learn from this batch
            m["learner/skipped_flat_batch"] = 1.0
            return m
        t3 = time.perf_counter()
        m.update({f"learner/{k}": v for k, v in self.learner.train_step(scored.train_batch).items()})
        m["time/learner_s"] = time.perf_counter() - t3
        return m

    def streamed_grpo_step(self, step: int) -> tuple[list[int], dict[str, float]]:
        """One update learned in parts (``trainer.stream_groups``): each part of the rollout is scored
        and sent to the learner as its groups finish, so learning overlaps the longest samples'
        decoding; on-policy. ``time/learner_s`` is the learning left after the last part arrived."""
        from rl.rollout.overlap import staleness
        from rl.step_scoring import score_groups, step_metrics

        batch, parts = self.rollouts.stream(step, self.cfg.trainer.stream_groups)
        scored, sent, reward_s, groups = [], [], 0.0, [None] * len(batch.indices)
        for positions, part in parts:
            t = time.perf_counter()
            scored.append(score_groups(self.cfg, self.rewards, self.tok.pad_token_id,
                                       [self.train_rows[batch.indices[p]] for p in positions], part))
            reward_s += time.perf_counter() - t
            if scored[-1].train_batch is not None:
                sent.append((scored[-1].train_batch, self.learner.accumulate(scored[-1].train_batch)))
            for p, g in zip(positions, part):
                groups[p] = g
        done = time.perf_counter()
        batch.groups, batch.rollout_s = groups, done - batch.submitted
        m = {"rollout/staleness": float(staleness(self.adapter_version, batch.versions)), "rollout/in_flight": 0.0,
             "time/rollout_wait_s": batch.rollout_s, "rollout/stream_parts": float(len(scored))}
        m.update(step_metrics(scored, batch.rollout_s, self.rollout.last_call_s, reward_s))
        if not sent:  # every group was flat: nothing to learn from this batch
            m["learner/skipped_flat_batch"] = 1.0
            return batch.indices, m
        m.update({f"learner/{k}": v for k, v in self.learner.apply(sent).items()})
        m["time/learner_s"] = time.perf_counter() - done
        return batch.indices, m

    def sft_step(self, rows: list[dict]) -> dict[str, float]:
        eos = self.tok.eos_token_id
        answers = [self.tok(r["answer"], add_special_tokens=False)["input_ids"][: self.cfg.rollout.max_new_tokens - 1]
                   + [eos] for r in rows]
        batch = sft_batch([r["prompt_ids"] for r in rows], answers, self.tok.pad_token_id, self.cfg.rollout.max_new_tokens)
        t = time.perf_counter()
        m = {f"learner/{k}": v for k, v in self.learner.train_step(batch).items()}
        m["time/learner_s"] = time.perf_counter() - t
        return m

    # ------------------------------------------------------------------ loop

    def fit(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        resumed = self.resume()
        if not resumed and cfg.trainer.eval_size:
            before = self.evaluate()
            self.metrics.log(0, {f"eval/{k}": v for k, v in before.items()})
            if before:
                log.info("test accuracy before training: %.3f on %d problems", before["accuracy_flexible"], before["n"])
        bar = tqdm(total=cfg.trainer.steps, initial=self.step, disable=not cfg.logging.progress,
                   desc="grpo" if cfg.algorithm.loss == "grpo" else "sft", dynamic_ncols=True)
        final_eval: dict = {}
        while self.step < cfg.trainer.steps:
            t = time.perf_counter()
            try:
                if self.rollouts is not None and cfg.trainer.stream_groups:
                    indices, m = self.streamed_grpo_step(self.step + 1)
                elif self.rollouts is not None:  # GRPO: collects this step's rollout, launches the next
                    batch = self.rollouts.take(self.step + 1)
                    indices, m = batch.indices, self.grpo_step(batch)
                else:
                    indices = self.sampler.next_indices(cfg.rollout.prompts_per_step)
                    m = self.sft_step([self.train_rows[i] for i in indices])
                self.step += 1
                self.trained_prompts[self.step] = indices
                self.wake_s = 0.0
                m.update(self._sync() if "time/learner_s" in m else {"time/sync_s": 0.0})  # no update, no new version
                m["time/wake_s"] = self.wake_s
            except LearnerDied as e:
                last = ckpt.latest_checkpoint(self.run_dir)
                where = (f"the last complete checkpoint is {last} (step {ckpt.load_driver_state(last)['step']}); "
                         "run the same command again to resume from it") if last else \
                    "no checkpoint was written yet; run the same command again to start afresh"
                raise LearnerDied(f"{e} during step {self.step + 1}; {where}") from e
            m["time/step_s"] = time.perf_counter() - t
            m.update(self.startup)
            self.startup = {}
            if self.rollout is not None:
                m["rollout/worker_restarts"] = float(self.rollout.restarts)
            last = self.step == cfg.trainer.steps
            if cfg.trainer.eval_every and self.step % cfg.trainer.eval_every == 0 or (last and cfg.trainer.eval_size):
                final_eval = self.evaluate()
                m.update({f"eval/{k}": v for k, v in final_eval.items()})
            self.metrics.log(self.step, m)
            if self.step % cfg.trainer.save_every == 0 or last:
                self.save()
            bar.set_postfix(progress_fields(m), refresh=False)
            bar.update(1)
        bar.close()
        return final_eval

    def close(self) -> None:
        """Stop what was started, in any state of start-up; safe to call twice."""
        for part in (self.metrics, self.rewards, self.eval_rewards):
            if part is not None:
                part.close()
        self.metrics = self.rewards = self.eval_rewards = None
        if self.rollout is not None:
            self.rollout.shutdown()
            self.rollout = None
        if self.learner is not None:
            self.learner.shutdown()
            self.learner = None
        if self.layout is not None:
            # Give the bundles back, so that later runs in the same Ray (compare, regime,
            # a notebook) find the resources free.
            from ray.util import remove_placement_group

            remove_placement_group(self.layout.placement_group)
            self.layout = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def train(cfg: Config, recipe: str = "run") -> Path:
    """Run (or resume) training; returns the run folder with metrics, config and checkpoints."""
    # Without logging.run_name every run gets a fresh timestamped folder, so resume=auto
    # only finds a checkpoint when the name is fixed (as the recipes and `ray job submit` do).
    run_dir = run_dir_for(cfg, recipe)
    trainer = Trainer(cfg, run_dir)
    try:
        final = trainer.fit()
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM turned into SystemExit
        last = ckpt.latest_checkpoint(run_dir)
        log.warning("stopped at step %d; %s", trainer.step, f"the last complete checkpoint is {last}; run the "
                    "same command again to resume from it" if last else "no checkpoint was written yet")
        raise
    finally:
        trainer.close()
    (run_dir / "final_eval.json").write_text(json.dumps(final, indent=1))
    if final and trainer.eval_problems:
        (run_dir / EVAL_PROBLEMS_FILE).write_text(json.dumps(trainer.eval_problems))
    return run_dir
