"""The garbage-collector pause meter the rollout worker wraps its adapter load in."""
import gc

from rl.rollout.gc_pauses import GcPauses


def _cycles(n: int) -> None:
    for _ in range(n):
        a: list = []
        a.append(a)  # unreachable once the loop moves on: only the collector frees it


def test_counts_the_collections_inside_the_block_only():
    gc.collect()
    with GcPauses() as pauses:
        _cycles(10_000)
        gc.collect()
    assert pauses.count >= 1 and pauses.seconds > 0
    seen = (pauses.count, pauses.seconds)
    gc.collect()  # after the block: not counted
    assert (pauses.count, pauses.seconds) == seen
    assert pauses._callback not in gc.callbacks


def test_no_collection_no_time():
    gc.collect()
    was = gc.isenabled()
    gc.disable()  # nothing may start a collection inside the block
    try:
        with GcPauses() as pauses:
            _cycles(100)
    finally:
        if was:
            gc.enable()
    assert pauses.count == 0 and pauses.seconds == 0.0


def test_callback_removed_when_the_block_raises():
    try:
        with GcPauses() as pauses:
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert pauses._callback not in gc.callbacks
