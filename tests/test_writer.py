"""The extract stage's background writer: order, back-pressure, errors reach the caller."""

from __future__ import annotations

import threading
import time

import pytest

from textdiff.extract.writer import BackgroundWriter


def test_writes_run_in_order_and_all_finish_before_the_block_ends():
    done = []
    with BackgroundWriter(depth=2) as writer:
        for i in range(20):
            writer.submit(lambda i=i: (time.sleep(0.001), done.append(i)))
    assert done == list(range(20))


def test_submit_blocks_while_depth_writes_wait():
    gate, started = threading.Event(), threading.Event()
    writer = BackgroundWriter(depth=1)
    writer.submit(lambda: (started.set(), gate.wait()))  # the thread is busy with this one
    started.wait()
    writer.submit(lambda: None)  # fills the queue
    blocked = threading.Thread(target=writer.submit, args=(lambda: None,))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()  # a third batch may not pile up in memory
    gate.set()
    blocked.join(5)
    assert not blocked.is_alive()
    writer.close()


def test_an_error_in_the_thread_reaches_the_caller_and_stops_later_writes():
    done = []

    def fail():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        with BackgroundWriter(depth=4) as writer:
            writer.submit(fail)
            time.sleep(0.05)
            for i in range(3):
                writer.submit(lambda i=i: done.append(i))
    assert done == []


def test_the_caller_s_error_wins_and_queued_writes_still_finish():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with BackgroundWriter(depth=4) as writer:
            writer.submit(lambda: (time.sleep(0.05), done.append(1)))
            raise KeyboardInterrupt
    assert done == [1]  # a batch the teacher finished is written, then the interrupt goes on


def test_unthreaded_writer_runs_each_write_at_once_with_the_same_error_semantics():
    done = []
    with BackgroundWriter(threaded=False) as writer:
        writer.submit(lambda: done.append(1))
        assert done == [1]  # already written: the CPU path has no thread to compete with the teacher
    with pytest.raises(OSError, match="disk full"):
        with BackgroundWriter(threaded=False) as writer:
            writer.submit(lambda: (_ for _ in ()).throw(OSError("disk full")))


def test_write_all_runs_chunks_at_once_and_returns_only_when_every_one_is_done():
    barrier = threading.Barrier(4, timeout=5)  # passes only if four writes run at the same time
    done = []
    with BackgroundWriter(workers=4) as writer:
        writer.write_all([lambda i=i: (barrier.wait(), time.sleep(0.01 * i), done.append(i)) for i in range(4)])
        assert sorted(done) == [0, 1, 2, 3]  # all finished before write_all returned


def test_write_all_waits_for_the_others_then_raises_the_first_error():
    done = []

    def fail():
        raise OSError("disk full")

    with BackgroundWriter(workers=3) as writer:
        with pytest.raises(OSError, match="disk full"):
            writer.write_all([fail, lambda: (time.sleep(0.05), done.append(1))])
        assert done == [1]  # the slow chunk was finished, not abandoned mid-write
    with BackgroundWriter(threaded=False, workers=3) as writer:  # no thread: no pool, one after another
        order = []
        writer.write_all([lambda: order.append(threading.current_thread().name) for _ in range(2)])
        assert order == [threading.main_thread().name] * 2
