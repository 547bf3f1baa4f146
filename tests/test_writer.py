"""The extract stage's background writer: order, back-pressure, errors reach the caller."""

from __future__ import annotations

import threading
import time

import pytest

from textdiff.writer import BackgroundWriter


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
