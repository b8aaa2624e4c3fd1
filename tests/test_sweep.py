"""`placerl learn sweep` without processes: the order, the GPU slots, skipping evaluated pairs,
requeueing on exit 3, failure isolation, and every validation error in one line naming its field.
(tests/test_sweep_e2e.py runs a real sweep on CPU.)"""
from pathlib import Path

import pytest
import yaml

from launch.learn_sweep import main as sweep_main
from launch.learn_sweep import parse_args, plan
from placement.scorers import check_budget
from rl.experiments.sweep import (CPU, Job, Slot, SweepError, SweepQueue, arm_overrides, assign, format_table,
                                  job_order, make_slots, parse_arms, parse_devices, parse_seeds, startable)

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "launch/configs/tiny.yaml")


def _run_to_end(queue: SweepQueue, slots: list[Slot], exits: dict[Job, list[int]]) -> list[list[tuple[Job, Slot]]]:
    """Simulate the runner: each wave starts what `assign` gives, then every running job exits
    with its next scripted status. Returns the waves."""
    waves = []
    while queue.pending:
        wave = assign(queue.pending, {}, slots)
        for job, _ in wave:
            queue.start(job)
        for job, _ in wave:
            queue.finish(job, (exits.get(job) or [0]).pop(0))
        waves.append(wave)
    return waves


def test_seed_major_order_keeps_a_seed_on_one_gpu():
    arms = ["a", "b", "c"]
    jobs = job_order(arms, [0, 1, 2])
    assert jobs[:3] == [Job("a", 0), Job("b", 0), Job("c", 0)] and jobs[3] == Job("a", 1)
    slots = make_slots(["0", "1"], 3)
    first = assign(jobs, {}, slots)
    # Seed 0 fills GPU 0, seed 1 GPU 1; seed 2 waits.
    assert {(j.seed, s.device) for j, s in first} == {(0, "0"), (1, "1")} and len(first) == 6
    # GPU 1 frees one slot while seed 0 still runs on GPU 0: seed 2's first arm goes there.
    running = {s: j for j, s in first if not (j == Job("a", 1))}
    nxt = assign([Job("a", 2), Job("b", 2)], running, slots)
    assert nxt == [(Job("a", 2), Slot("1", 0))]
    # A seed already running somewhere with room goes there, not to the emptier GPU.
    running = {Slot("0", 0): Job("a", 2), Slot("1", 0): Job("x", 5)}
    assert assign([Job("b", 2)], running, slots)[0][1].device == "0"
    # No room: nothing is assigned; an empty queue assigns nothing.
    assert assign(jobs, {s: Job("z", 9) for s in slots}, slots) == [] and assign([], {}, slots) == []


def test_new_seed_goes_to_the_emptiest_gpu_and_slots_are_distinct():
    slots = make_slots(["0", "1"], 4)
    running = {Slot("0", 0): Job("a", 0)}
    wave = assign(job_order(["p", "q"], [1]), running, slots)
    assert [s.device for _, s in wave] == ["1", "1"]
    full = assign(job_order(list("abcdefgh"), [0, 1]), {}, slots)
    assert len({s for _, s in full}) == 8 == len(full)
    with pytest.raises(SweepError, match="--per-gpu"):
        make_slots(["0"], 0)


def test_stagger_starts_one_per_ready_gpu_and_keeps_the_others_in_place():
    slots = make_slots(["0", "1"], 2)
    todo = assign(job_order(["a", "b"], [0, 1]), {}, slots)
    now = startable(todo, ready={"0", "1"}, one_per_device=True)
    assert now == [(Job("a", 0), Slot("0", 0)), (Job("a", 1), Slot("1", 0))]
    assert startable(todo, ready={"1"}, one_per_device=True) == [(Job("a", 1), Slot("1", 0))]
    assert startable(todo, ready={"0", "1"}, one_per_device=False) == todo


def test_queue_skips_evaluated_requeues_exit_3_and_isolates_failures():
    jobs = job_order(["a", "b", "c"], [0])
    queue = SweepQueue(jobs, max_resumes=2, evaluated_before={Job("c", 0)})
    assert queue.pending == [Job("a", 0), Job("b", 0)] and queue.outcome[Job("c", 0)] == "evaluated before"
    # a runs out of budget twice (resumed both times) and then finishes; b fails at once.
    waves = _run_to_end(queue, [Slot(CPU, 0)], {Job("a", 0): [3, 3, 0], Job("b", 0): [1]})
    assert [w[0][0] for w in waves] == [Job("a", 0), Job("a", 0), Job("a", 0), Job("b", 0)]
    assert queue.calls == {Job("a", 0): 3, Job("b", 0): 1, Job("c", 0): 0}
    assert queue.outcome == {Job("a", 0): "evaluated", Job("b", 0): "failed (exit 1)", Job("c", 0): "evaluated before"}
    assert queue.failed == [Job("b", 0)]


def test_requeue_is_bounded_and_keeps_the_job_at_its_place():
    jobs = job_order(["a", "b"], [0, 1])
    queue = SweepQueue(jobs, max_resumes=1)
    assert queue.start(Job("a", 0)) == 1 and queue.start(Job("b", 0)) == 1
    assert queue.finish(Job("a", 0), 3) == "requeued"
    assert queue.pending == [Job("a", 0), Job("a", 1), Job("b", 1)]  # before seed 1's arms, not after
    queue.start(Job("a", 0))
    assert queue.finish(Job("a", 0), 3) == "unfinished after 2 calls" and Job("a", 0) not in queue.pending
    assert queue.finish(Job("b", 0), -9) == "failed (exit -9)"
    assert queue.failed == [Job("a", 0), Job("b", 0)]


def test_table_and_overrides_order():
    arms = parse_arms({"common": ["trainer.steps=5", "placement.rank=8"], "arms": {"r1": ["placement.rank=1"], "u": []}})
    assert arm_overrides(arms, "r1", ["trainer.steps=2"]) == ["trainer.steps=5", "placement.rank=8",
                                                              "trainer.steps=2", "placement.rank=1"]
    text = format_table([{"arm": "u", "seed": 0, "status": "evaluated", "steps": 2, "flexible": 0.25},
                         {"arm": "r1", "seed": 1, "status": "failed (exit 1)", "steps": None, "flexible": None}])
    lines = text.splitlines()
    assert lines[0].split() == ["arm", "seed", "status", "steps", "test", "flexible"]
    assert lines[1].split() == ["u", "0", "evaluated", "2", "0.2500"] and lines[2].split()[-2:] == ["-", "-"]


@pytest.mark.parametrize("tree, field", [
    ({"arms": {"a": []}, "seeds": [0]}, "unknown key 'seeds'"),
    ({"common": []}, "'arms' must map"),
    ({"arms": {"a b": []}}, "arm name 'a b'"),
    ({"arms": {"a": "placement.rank=1"}}, "arms.a must be a list"),
    ({"common": ["placement.rank"], "arms": {"a": []}}, "common must be a list"),
    (["a"], "must be a mapping"),
])
def test_arms_file_errors_are_one_line_naming_the_field(tree, field):
    with pytest.raises(SweepError) as e:
        parse_arms(tree, "--arms x.yaml")
    assert field in str(e.value) and "\n" not in str(e.value)


def test_seed_and_gpu_lists():
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds(" 3 ") == [3]
    assert parse_devices("0, 1") == ["0", "1"]
    for bad in ("0,x", "", "1,1", "-1"):
        with pytest.raises(SweepError, match="--seeds"):
            parse_seeds(bad)
    for bad in ("", "0,0", "cpu"):
        with pytest.raises(SweepError, match="--gpus"):
            parse_devices(bad)


def test_static_budget_check_refuses_bmask_without_an_entry_budget():
    for scorer in ("bmask", "bmask_random"):
        for budget in ("", "rank=8"):
            with pytest.raises(ValueError, match="placement.budget.*fraction"):
                check_budget(scorer, budget)
        check_budget(scorer, "fraction=0.125")
    check_budget("uniform", "")
    with pytest.raises(ValueError, match="not a known scorer"):
        check_budget("no_such_scorer", "")


def test_a_run_checks_the_budget_before_its_probe_rollout():
    from rl.config import load_config
    from rl.placement_probe import plan_for_run

    # No model at that path and no rows: only a check made before the GRPO probe can answer.
    with pytest.raises(ValueError, match="placement.budget=empty cannot be spent by placement.scorer=bmask"):
        plan_for_run(load_config(TINY, ["placement.scorer=bmask"]), "/no/such/model", [])


def _plan_error(tmp_path, monkeypatch, arms: dict, *argv: str, gpus: str | None = "0,1") -> str:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", gpus or "")  # visible devices without asking torch
    path = tmp_path / "arms.yaml"
    path.write_text(yaml.safe_dump(arms))
    args = parse_args(["--out", str(tmp_path / "out"), "--config", TINY, "--arms", str(path), *argv])
    with pytest.raises(SweepError) as e:
        plan(args)
    assert "\n" not in str(e.value)
    return str(e.value)


SHARING = ["rollout.gpu_kv_cache_gb=3", "rollout.sleep_mode=false"]


def test_validation_errors_before_anything_starts(tmp_path, monkeypatch):
    ok = {"common": SHARING, "arms": {"u": [], "r1": ["placement.rank=1"]}}
    err = _plan_error(tmp_path, monkeypatch, {"arms": {"b": ["placement.scorer=bmask"]}})
    assert err.startswith("arm b: placement.budget=empty") and "fraction" in err
    assert "arm u: " in _plan_error(tmp_path, monkeypatch, {"arms": {"u": ["placement.rank=0"]}})
    assert "placement.rank" in _plan_error(tmp_path, monkeypatch, {"arms": {"u": ["placement.rank=0"]}})
    err = _plan_error(tmp_path, monkeypatch, {"arms": {"u": ["rollout.sleep_mode=false"]}}, "--per-gpu", "2")
    assert "rollout.gpu_kv_cache_gb" in err and "--per-gpu 2" in err
    err = _plan_error(tmp_path, monkeypatch, {"arms": {"u": ["rollout.gpu_kv_cache_gb=3"]}}, "--per-gpu", "2")
    assert "rollout.sleep_mode" in err and "false" in err
    err = _plan_error(tmp_path, monkeypatch, {"common": SHARING, "arms": {"u": [], "v": ["data.val_size=8"]}})
    assert err.startswith("arm v: data=") and "common" in err
    assert "--seeds" in _plan_error(tmp_path, monkeypatch, ok, "--seeds", "0,a")
    assert "--reference" in _plan_error(tmp_path, monkeypatch, ok, "--summary", "r", "--reference", "nope")
    assert "--budget-s" in _plan_error(tmp_path, monkeypatch, ok, "--budget-s", "0")
    assert "--per-gpu" in _plan_error(tmp_path, monkeypatch, ok, "--per-gpu", "2", gpus=None)
    assert "--arms" in _plan_error(tmp_path, monkeypatch, ok, "--arms", str(tmp_path / "missing.yaml"))
    # One GPU per arm needs neither setting; the plan is then returned, nothing started.
    arms, seeds, slots, overrides = plan(parse_args(["--out", str(tmp_path / "out"), "--config", TINY, "--arms",
                                                     str(tmp_path / "arms.yaml"), "--seeds", "0,1", "--gpus", "1"]))
    assert seeds == [0, 1] and slots == [Slot("1", 0)] and overrides["r1"][-1] == "placement.rank=1"


def test_an_arm_started_with_other_overrides_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    (tmp_path / "out" / "arms" / "u" / "seed-0").mkdir(parents=True)
    (tmp_path / "out" / "arms" / "u" / "seed-0" / "arm.json").write_text('{"overrides": ["learner.lr=1"]}')
    err = _plan_error(tmp_path, monkeypatch, {"arms": {"u": []}}, gpus="")
    assert err.startswith("arm u seed 0") and "rename the arm" in err


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    (tmp_path / "a.yaml").write_text("arms: {u: []}\nextra: 1\n")
    assert sweep_main(["--out", str(tmp_path), "--config", TINY, "--arms", str(tmp_path / "a.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --arms") and "unknown key 'extra'" in err and len(err.splitlines()) == 1


SWEEPS = sorted((Path(__file__).resolve().parent.parent / "launch" / "configs" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("arms_file", SWEEPS, ids=lambda p: p.stem)
def test_every_shipped_arms_file_loads_on_the_gpu_recipe(arms_file):
    from placement.scorers import check_budget
    from rl.config import load_config
    from rl.experiments.sweep import read_arms

    arms = read_arms(arms_file)
    for name, own in arms.arms.items():
        cfg = load_config("launch/configs/qwen2.5-coder-0.5b_gsm8k_grpo_gpu.yaml", arms.common + own)
        check_budget(cfg.placement.scorer, cfg.placement.budget)
        assert cfg.rollout.gpu_kv_cache_gb > 0 and cfg.rollout.sleep_mode is False, name  # several per GPU


def test_the_overlap_sweep_shares_the_placement_sweeps_uniform_arm():
    # The overlap arms are compared with uniform-r8 of the placement sweep: the same override list.
    from rl.experiments.sweep import read_arms

    folder = SWEEPS[0].parent
    placement, overlap = read_arms(folder / "placement_arms.yaml"), read_arms(folder / "overlap_arms.yaml")
    assert overlap.common == placement.common and overlap.arms["uniform-r8"] == placement.arms["uniform-r8"] == []


def test_the_long_run_is_the_uniform_arm_trained_three_times_longer():
    from rl.config import load_config
    from rl.experiments.sweep import read_arms

    folder = SWEEPS[0].parent
    placement, long_run = read_arms(folder / "placement_arms.yaml"), read_arms(folder / "long_run_arms.yaml")
    assert long_run.common == placement.common
    recipe = "launch/configs/qwen2.5-coder-0.5b_gsm8k_grpo_gpu.yaml"
    short = load_config(recipe, placement.common + placement.arms["uniform-r8"]).to_dict()
    (arm, own), = long_run.arms.items()
    long = load_config(recipe, long_run.common + own).to_dict()
    assert long["trainer"].pop("steps") == 3 * short["trainer"].pop("steps") == 150
    # all six checkpoints kept for PAGE stability at steps 50 and 100: storage, not the run's math
    assert long["trainer"].pop("keep_checkpoints") == 6 and short["trainer"].pop("keep_checkpoints") == 2
    assert long == short, arm


def test_children_share_the_hosts_cores_unless_the_user_set_threads(monkeypatch):
    from rl.experiments.sweep_runner import child_env, threads_per_child

    assert threads_per_child(32, 14) == 2 and threads_per_child(32, 64) == 1 and threads_per_child(2, 1) == 2
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = child_env("1", threads=2)
    assert env["OMP_NUM_THREADS"] == "2" and env["CUDA_VISIBLE_DEVICES"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert child_env(CPU, threads=2)["OMP_NUM_THREADS"] == "8"
