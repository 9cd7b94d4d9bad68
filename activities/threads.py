"""Starting threads from a synchronous activity."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import ParamSpec, TypeVar

from temporalio import activity

_P = ParamSpec("_P")
_T = TypeVar("_T")


def submit(
    pool: Executor, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
) -> Future[_T]:
    """`pool.submit(fn, ...)` with the activity's cancel held until it returns.

    A thread pool starts its threads in `submit`. The worker cancels a synchronous activity by
    raising into its thread by thread id, and CPython 3.11 gives a thread it is starting the
    starter's id until the new thread first runs: a cancel in that instant lands in the new
    thread, which dies before it reports started, and `submit` then waits for it forever
    while holding the lock every other `submit` in the process needs (the whole worker
    stops). Held here, the cancel is raised as `submit` returns, when the new thread has its
    own id."""
    if not activity.in_activity():
        return pool.submit(fn, *args, **kwargs)
    with activity.shield_thread_cancel_exception():
        return pool.submit(fn, *args, **kwargs)
