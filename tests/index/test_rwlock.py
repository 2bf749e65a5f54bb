"""The index service's readers-writer lock: readers share it, a writer holds it alone and is not starved."""

from __future__ import annotations

import threading
import time

import pytest

from compatembed_index.rwlock import RWLock

WAIT = 5.0  # seconds a thread may take to do what it must do (generous: the machine may be loaded)
SETTLE = 0.2  # seconds given to a thread that must NOT get in, before checking that it did not


def start(target) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_readers_hold_the_lock_together():
    lock, n = RWLock(), 4
    inside = threading.Barrier(n, timeout=WAIT)  # passes only when all n readers are inside at once
    errors: list[BaseException] = []

    def reader():
        try:
            with lock.read():
                inside.wait()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [start(reader) for _ in range(n)]
    for thread in threads:
        thread.join(WAIT)
    assert errors == [] and not any(t.is_alive() for t in threads)


@pytest.mark.parametrize("held", ["read", "write"])
def test_a_writer_waits_for_the_holder(held):
    lock = RWLock()
    entered, release, wrote = threading.Event(), threading.Event(), threading.Event()

    def holder():
        with getattr(lock, held)():
            entered.set()
            release.wait(WAIT)

    def writer():
        with lock.write():
            wrote.set()

    first = start(holder)
    assert entered.wait(WAIT)
    second = start(writer)
    assert not wrote.wait(SETTLE)  # the holder is still inside
    release.set()
    assert wrote.wait(WAIT)
    first.join(WAIT)
    second.join(WAIT)


def test_a_reader_waits_for_a_writer():
    lock = RWLock()
    entered, release, read = threading.Event(), threading.Event(), threading.Event()

    def writer():
        with lock.write():
            entered.set()
            release.wait(WAIT)

    def reader():
        with lock.read():
            read.set()

    start(writer)
    assert entered.wait(WAIT)
    start(reader)
    assert not read.wait(SETTLE)
    release.set()
    assert read.wait(WAIT)


def test_a_waiting_writer_goes_before_readers_that_arrive_after_it():
    """Writer preference: a stream of searches cannot starve an upgrade."""
    lock = RWLock()
    order: list[str] = []
    first_in, release_first = threading.Event(), threading.Event()

    def first_reader():
        with lock.read():
            first_in.set()
            release_first.wait(WAIT)
            order.append("first reader")

    def writer():
        with lock.write():
            order.append("writer")

    def late_reader():
        with lock.read():
            order.append("late reader")

    threads = [start(first_reader)]
    assert first_in.wait(WAIT)
    threads.append(start(writer))
    deadline = time.monotonic() + WAIT
    while lock._waiting_writers == 0 and time.monotonic() < deadline:  # the writer is queued
        time.sleep(0.01)
    assert lock._waiting_writers == 1
    threads.append(start(late_reader))
    time.sleep(SETTLE)
    assert order == []  # the late reader does not slip in ahead of the waiting writer
    release_first.set()
    for thread in threads:
        thread.join(WAIT)
    assert order == ["first reader", "writer", "late reader"]


@pytest.mark.parametrize("mode", ["read", "write"])
def test_an_exception_inside_releases_the_lock(mode):
    lock = RWLock()
    with pytest.raises(RuntimeError):
        with getattr(lock, mode)():
            raise RuntimeError("boom")
    done = threading.Event()

    def writer():
        with lock.write():
            done.set()

    start(writer)
    assert done.wait(WAIT)
    assert (lock._readers, lock._writer, lock._waiting_writers) == (0, False, 0)


def test_readers_never_see_a_half_done_write():
    """Writers update two values one after the other; every reader sees them equal."""
    lock = RWLock()
    state = {"a": 0, "b": 0}
    torn, stop = [], threading.Event()

    def writer():
        for _ in range(200):
            with lock.write():
                state["a"] += 1
                time.sleep(0)  # let other threads run between the two halves
                state["b"] += 1

    def reader():
        while not stop.is_set():
            with lock.read():
                a = state["a"]
                time.sleep(0)
                if state["b"] != a:
                    torn.append((a, state["b"]))

    readers = [start(reader) for _ in range(3)]
    writers = [start(writer) for _ in range(2)]
    for thread in writers:
        thread.join(4 * WAIT)
    stop.set()
    for thread in readers:
        thread.join(WAIT)
    assert not any(t.is_alive() for t in writers + readers)
    assert torn == [] and state == {"a": 400, "b": 400}
