"""The guard's threads leave the worker's signals to the main thread."""

from __future__ import annotations

import signal
import threading

from celery_guard.protect import signals_to_the_main_thread, threads_without_signals


def _mask_in_a_thread(body: object) -> set[int]:
    found: set[int] = set()

    def run() -> None:
        if callable(body):
            body()
        found.update(signal.pthread_sigmask(signal.SIG_BLOCK, set()))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return found


def test_a_guard_thread_blocks_the_workers_signals_not_its_own_faults() -> None:
    blocked = _mask_in_a_thread(signals_to_the_main_thread)
    assert {signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGUSR1} <= blocked
    assert signal.SIGSEGV not in blocked and signal.SIGBUS not in blocked
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, set())  # this one


def test_threads_started_inside_inherit_the_mask_and_the_caller_gets_its_own_back() -> None:
    with threads_without_signals():
        blocked = _mask_in_a_thread(None)
    assert signal.SIGTERM in blocked
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, set())
