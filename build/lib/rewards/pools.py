"""Worker pools that run reward calls with a per-call timeout: threads or processes.

Both take a list of calls ``(function_index, payload)`` and return one outcome per call
(see ``rewards.calling``); the clock of a call starts when a worker picks it up, so calls
queued behind others are not penalised. A call past ``timeout_s`` gets ``("timeout",)``.

Threads vs processes (the trade-off users pick with ``reward.executor``):

* **thread**: no start-up cost, nothing pickled, any callable works. But Python cannot stop
  a thread: a timed-out call is *abandoned*; its thread keeps running (daemon, so it never
  blocks exit) and a fresh thread takes its place, so the pool keeps its size and later
  batches do not queue behind it. Every hung call leaks one thread until it returns
  (``leaked_threads`` in the metrics). A hang that holds the GIL (a catastrophic regex, a
  C loop) freezes the whole process, timeouts included. Pure-Python rewards share one
  core through the GIL.
* **process**: ``spawn``ed workers rebuild each function from its ``RewardRef``; a
  timed-out call's worker is killed and replaced, so a hang costs nothing after its
  timeout, and CPU-bound rewards use every core. Costs: 1-2 s to start a worker (again
  after each kill), every slice of the batch is pickled to a worker, and a script that
  builds a process runner needs an ``if __name__ == "__main__":`` guard (spawn re-imports it).

Left out: autoscaling the pool, and restarting a worker that leaks memory.
"""
from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import queue
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from rewards.calling import TIMEOUT, execute
from rewards.registry import PreparedReward, RewardError, RewardRef, prepare

_BOOT_LIMIT_S = 120.0  # a worker process that cannot import the rewards in this long is broken


@dataclass
class _ThreadWorker:
    thread: threading.Thread | None = None
    current: tuple | None = None  # (generation, call id, start time) while busy
    abandoned: bool = False


class ThreadCalls:
    """A fixed number of daemon threads; a timed-out thread is replaced, not waited for."""

    def __init__(self, preps: list[PreparedReward], workers: int):
        self._preps = preps
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._workers: list[_ThreadWorker] = []
        self._leaked: list[_ThreadWorker] = []
        self._generation = 0
        for _ in range(workers):
            self._spawn()

    def _spawn(self) -> None:
        w = _ThreadWorker()
        w.thread = threading.Thread(target=self._loop, args=(w,), daemon=True, name="reward-thread")
        self._workers.append(w)
        w.thread.start()

    def _loop(self, w: _ThreadWorker) -> None:
        while True:
            item = self._tasks.get()
            if item is None:
                return
            gen, cid, idx, payload = item
            w.current = (gen, cid, time.monotonic())
            outcome = execute(self._preps[idx], *payload)
            w.current = None
            self._results.put((gen, cid, outcome))  # the parent ignores it if it gave the call up
            if w.abandoned:
                return  # already replaced: taking more work would grow the pool

    @property
    def leaked(self) -> int:
        self._leaked = [w for w in self._leaked if w.thread.is_alive()]
        return len(self._leaked)

    def run(self, calls: list[tuple[int, tuple]], timeout_s: float) -> list[tuple]:
        self._generation += 1
        gen, outcomes = self._generation, {}
        for cid, (idx, payload) in enumerate(calls):
            self._tasks.put((gen, cid, idx, payload))
        while len(outcomes) < len(calls):
            now = time.monotonic()
            deadline = now + timeout_s
            # Abandoned threads are scanned too: one may have picked up a new call just
            # before it was given up, and that call still needs its deadline.
            for w in self._workers + self._leaked:
                cur = w.current
                if cur is None or cur[0] != gen or cur[1] in outcomes:
                    continue
                if now - cur[2] > timeout_s:
                    outcomes[cur[1]] = TIMEOUT
                    if not w.abandoned:
                        w.abandoned = True
                        self._workers.remove(w)
                        self._leaked.append(w)
                        self._spawn()
                else:
                    deadline = min(deadline, cur[2] + timeout_s)
            try:
                g, cid, outcome = self._results.get(timeout=max(0.001, deadline - now + 0.001))
            except queue.Empty:
                continue
            if g == gen and cid not in outcomes:
                outcomes[cid] = outcome
        return [outcomes[i] for i in range(len(calls))]

    def close(self) -> None:
        for _ in self._workers:
            self._tasks.put(None)
        self._workers = []


def _process_main(conn, refs: list[RewardRef]) -> None:
    # Ctrl-C goes to the whole process group; the parent decides how to stop, not the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        preps = [prepare(r) for r in refs]
    except Exception as e:  # noqa: BLE001 - reported to the parent as one line
        conn.send(("broken", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready",))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        calls, payload = msg
        for cid, idx in calls:  # one after the other; each result goes back as soon as it exists
            conn.send((cid, execute(preps[idx], *payload)))


@dataclass
class _Proc:
    process: mp.Process
    conn: multiprocessing.connection.Connection
    born: float = field(default_factory=time.monotonic)
    ready: bool = False
    job: deque | None = None  # (call id, function index) still to finish, first one running
    payload: tuple | None = None
    started: float = 0.0  # when the running call began (the previous result's arrival)


class ProcessCalls:
    """Spawned worker processes; a timed-out or crashed worker is killed and replaced.

    The calls that share one slice of the batch travel as one job (the slice is pickled
    once, and a worker runs the functions back to back); a result's arrival starts the next
    call's clock. When a call times out or its worker dies, the job's later calls are put
    back in the queue: they are not to blame.
    """

    def __init__(self, refs: list[RewardRef], workers: int):
        self._refs = refs
        self._ctx = mp.get_context("spawn")  # fork is unsafe with Ray/torch threads in the parent
        self._procs = [self._spawn() for _ in range(workers)]

    def _spawn(self) -> _Proc:
        parent, child = self._ctx.Pipe()
        p = self._ctx.Process(target=_process_main, args=(child, self._refs), daemon=True, name="reward-worker")
        p.start()
        child.close()
        return _Proc(p, parent)

    def _replace(self, pr: _Proc, pending: deque) -> None:
        if pr.job and len(pr.job) > 1:
            pending.appendleft((list(pr.job)[1:], pr.payload))
        pr.process.kill()
        pr.process.join(5)
        pr.conn.close()
        self._procs[self._procs.index(pr)] = self._spawn()

    leaked = 0  # processes are killed, never leaked

    def run(self, calls: list[tuple[int, tuple]], timeout_s: float) -> list[tuple]:
        pending, outcomes = deque(), {}
        for cid, (idx, payload) in enumerate(calls):
            if pending and pending[-1][1] is payload:
                pending[-1][0].append((cid, idx))
            else:
                pending.append(([(cid, idx)], payload))
        while len(outcomes) < len(calls):
            for pr in self._procs:
                if pr.ready and not pr.job and pending:
                    job, pr.payload = pending.popleft()
                    pr.conn.send((job, pr.payload))
                    pr.job, pr.started = deque(job), time.monotonic()
            now = time.monotonic()
            busy = [pr.started + timeout_s for pr in self._procs if pr.job]
            wait_s = max(0.0, min(busy) - now) if busy else 0.5
            ready = multiprocessing.connection.wait([pr.conn for pr in self._procs], timeout=wait_s + 0.001)
            for pr in [p for p in self._procs if p.conn in ready]:
                try:
                    msg = pr.conn.recv()
                except (EOFError, OSError):
                    if pr.job:
                        outcomes[pr.job[0][0]] = ("error", "WorkerDied", f"reward worker process exited with "
                                                  f"code {pr.process.exitcode} during this call", "", "worker")
                    self._replace(pr, pending)
                    continue
                if msg[0] == "ready":
                    pr.ready = True
                elif msg[0] == "broken":
                    raise RewardError(f"a reward worker process could not load the rewards: {msg[1]}")
                else:
                    outcomes[msg[0]] = msg[1]
                    pr.job.popleft()
                    pr.started = time.monotonic()
            now = time.monotonic()
            for pr in list(self._procs):
                if pr.job and now - pr.started > timeout_s:
                    outcomes[pr.job[0][0]] = TIMEOUT
                    self._replace(pr, pending)
                elif not pr.ready and now - pr.born > _BOOT_LIMIT_S:
                    raise RewardError(f"a reward worker process did not start within {_BOOT_LIMIT_S:.0f} s; "
                                      "use reward.executor=thread or check that the reward modules import")
        return [outcomes[i] for i in range(len(calls))]

    def close(self) -> None:
        for pr in self._procs:
            try:
                pr.conn.send(None)
            except OSError:
                pass
        for pr in self._procs:
            pr.process.join(2)
            if pr.process.is_alive():
                pr.process.kill()
                pr.process.join(2)
            pr.conn.close()
        self._procs = []
