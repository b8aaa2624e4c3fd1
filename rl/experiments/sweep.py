"""A sweep's plan: the arms file, the (arm, seed) jobs, which job runs next on which GPU slot,
and what each exit status means.

Pure functions and one small queue, so that the order, the slots, skipping evaluated pairs,
requeueing and failure isolation are tested without starting a process
(rl/experiments/sweep_runner.py starts and watches the ``placerl learn arm`` processes).

The arms file (YAML)::

    common: [data.val_size=500, trainer.steps=50]    # applied to every arm
    arms:
      uniform-r8: []
      rank1: [placement.rank=1]

An arm's overrides are ``common``, then the command line's, then the arm's own, so that an
arm's own setting (``placement.rank=1``) wins over a setting shared by all.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# The same names `placerl learn arm --arm` accepts: an arm names a folder.
ARM_NAME = re.compile(r"[A-Za-z0-9._-]+")
ARMS_FILE_KEYS = ("common", "arms")
CPU = "cpu"  # the one slot of a host without CUDA devices


class SweepError(ValueError):
    """A sweep argument or arms-file problem, in one line naming the field and the fix."""


@dataclass(frozen=True)
class Job:
    arm: str
    seed: int

    @property
    def label(self) -> str:
        return f"{self.arm}-s{self.seed}"


@dataclass(frozen=True)
class Slot:
    device: str  # a CUDA_VISIBLE_DEVICES value for the child, or CPU
    index: int  # which of the device's --per-gpu places


@dataclass
class ArmsFile:
    common: list[str]
    arms: dict[str, list[str]]


def _overrides(value, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise SweepError(f"{where} must be a list of 'key=value' strings (quote a value that holds ': ' or "
                         f"braces), got {value!r:.120}")
    return list(value)


def parse_arms(tree, source: str = "the arms file") -> ArmsFile:
    """An arms file's content, checked: known keys, arm names, lists of overrides."""
    if not isinstance(tree, dict):
        raise SweepError(f"{source} must be a mapping with the keys {', '.join(ARMS_FILE_KEYS)}")
    unknown = [k for k in tree if k not in ARMS_FILE_KEYS]
    if unknown:
        raise SweepError(f"{source}: unknown key {unknown[0]!r}; the keys are {', '.join(ARMS_FILE_KEYS)} "
                         "(put arms under 'arms:')")
    arms = tree.get("arms")
    if not isinstance(arms, dict) or not arms:
        raise SweepError(f"{source}: 'arms' must map each arm's name to its list of overrides ([] for none)")
    for name in arms:
        if not isinstance(name, str) or not ARM_NAME.fullmatch(name):
            raise SweepError(f"{source}: arm name {name!r} must be letters, digits, '.', '_' or '-' (it names a folder)")
    return ArmsFile(_overrides(tree.get("common"), f"{source}: common"),
                    {name: _overrides(v, f"{source}: arms.{name}") for name, v in arms.items()})


def read_arms(path: str | Path) -> ArmsFile:
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"--arms {path}: no such file; write one like launch/configs/sweeps/placement_arms.yaml")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"--arms {path}: not YAML ({str(e).splitlines()[0]})") from None
    return parse_arms(tree, f"--arms {path}")


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]: distinct non-negative integers."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SweepError(f"--seeds {text!r} must be comma-separated integers, e.g. --seeds 0,1,2") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise SweepError(f"--seeds {text!r} must name distinct non-negative integers, e.g. --seeds 0,1,2")
    return seeds


def parse_devices(text: str) -> list[str]:
    """``"0,1"`` -> ["0", "1"]: each a CUDA_VISIBLE_DEVICES value given to one child (an index or a UUID)."""
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices or len(set(devices)) != len(devices) or CPU in devices:
        raise SweepError(f"--gpus {text!r} must name distinct CUDA devices, e.g. --gpus 0,1 "
                         "(leave it out for every visible one, or for CPU on a host without CUDA)")
    return devices


def make_slots(devices: list[str], per_device: int) -> list[Slot]:
    if per_device < 1:
        raise SweepError(f"--per-gpu {per_device} must be >= 1")
    return [Slot(d, i) for d in devices for i in range(per_device)]


def arm_overrides(arms: ArmsFile, arm: str, extra: list[str]) -> list[str]:
    """What `learn arm` gets for ``arm``: common, the command line's, then the arm's own (which win)."""
    return [*arms.common, *extra, *arms.arms[arm]]


def job_order(arms: list[str], seeds: list[int]) -> list[Job]:
    """Seed-major: every arm of seed 0, then every arm of seed 1, ... Arms compared at the same
    seed should share conditions, so the arms of one seed start together (and, through
    :func:`assign`, on one GPU when there is room): their step times and any contention are
    then the same, and a paired comparison per seed compares placements, not GPUs."""
    return [Job(arm, seed) for seed in seeds for arm in arms]


def assign(pending: list[Job], running: dict[Slot, Job], slots: list[Slot]) -> list[tuple[Job, Slot]]:
    """The free slots filled from ``pending`` in order: each job goes to a device already running
    (or given here) a job of its seed when one has a free slot, else to the device with the
    most free slots (the first listed on ties), so that a new seed starts on an empty GPU."""
    free: dict[str, list[Slot]] = {}
    for s in slots:
        free.setdefault(s.device, [])
        if s not in running:
            free[s.device].append(s)
    seeds_on = {d: {j.seed for s, j in running.items() if s.device == d} for d in free}
    out = []
    for job in pending:
        open_devices = [d for d in free if free[d]]
        if not open_devices:
            break
        same = [d for d in open_devices if job.seed in seeds_on[d]]
        device = max(same or open_devices, key=lambda d: len(free[d]))  # max keeps the first on ties
        out.append((job, free[device].pop(0)))
        seeds_on[device].add(job.seed)
    return out


def startable(assignments: list[tuple[Job, Slot]], ready: set[str], one_per_device: bool) -> list[tuple[Job, Slot]]:
    """The assignments that may start now: on a ``ready`` device (its stagger has passed), and
    with a stagger only the first per device. The others keep their place: :func:`assign`
    gives them the same slots on the next call unless a job finished meanwhile."""
    out, used = [], set()
    for job, slot in assignments:
        if slot.device in ready and not (one_per_device and slot.device in used):
            out.append((job, slot))
            used.add(slot.device)
    return out


# What an arm's exit status means (launch/learn.py): 0 evaluated, 3 budget ran out at a
# checkpoint (the same command resumes it), anything else a failure of that arm alone.
EXIT_EVALUATED, EXIT_BUDGET = 0, 3


@dataclass
class SweepQueue:
    """The jobs still to run, in :func:`job_order`, and each job's calls and outcome.

    An arm whose budget ran out (status 3) goes back into the queue at its place, at most
    ``max_resumes`` times; any other failure is recorded and the rest carry on.
    """
    jobs: list[Job]
    max_resumes: int
    evaluated_before: set[Job] = field(default_factory=set)
    pending: list[Job] = field(init=False)
    calls: dict[Job, int] = field(init=False)
    outcome: dict[Job, str] = field(init=False)

    def __post_init__(self):
        self.pending = [j for j in self.jobs if j not in self.evaluated_before]
        self.calls = {j: 0 for j in self.jobs}
        self.outcome = {j: "evaluated before" for j in self.jobs if j in self.evaluated_before}

    def start(self, job: Job) -> int:
        """Take ``job`` off the queue; returns its call number (1 for the first)."""
        self.pending.remove(job)
        self.calls[job] += 1
        return self.calls[job]

    def finish(self, job: Job, status: int) -> str:
        """Record an exit; returns the outcome: evaluated, requeued, unfinished or failed (exit N)."""
        if status == EXIT_EVALUATED:
            result = "evaluated"
        elif status == EXIT_BUDGET and self.calls[job] <= self.max_resumes:
            order = {j: i for i, j in enumerate(self.jobs)}
            self.pending.append(job)
            self.pending.sort(key=order.__getitem__)  # back at its place: its seed's arms stay together
            result = "requeued"
        elif status == EXIT_BUDGET:
            result = f"unfinished after {self.calls[job]} calls"
        else:
            result = f"failed (exit {status})"
        if result != "requeued":
            self.outcome[job] = result
        return result

    def stop(self, job: Job) -> None:
        self.outcome[job] = "stopped"

    @property
    def failed(self) -> list[Job]:
        return [j for j in self.jobs if self.outcome.get(j, "").startswith(("failed", "unfinished", "stopped"))]


def format_table(rows: list[dict]) -> str:
    """Rows of arm, seed, status, steps, test flexible (None when the arm has no evaluation)."""
    head = ("arm", "seed", "status", "steps", "test flexible")
    cells = [head] + [(r["arm"], str(r["seed"]), r["status"], "-" if r["steps"] is None else str(r["steps"]),
                       "-" if r["flexible"] is None else f"{r['flexible']:.4f}") for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)
