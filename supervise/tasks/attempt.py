"""One attempt of a task, wherever it runs: import the target, run it with a `TaskContext`,
commit what is left and record the outcome (the result, or the error's type and message)."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import re
import traceback
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from supervise.tasks.context import TaskContext
from supervise.tasks.journal import Outcome
from supervise.tasks.policy import type_name
from supervise.tasks.values import encode

TaskFunction = Callable[..., Awaitable[Any]]
_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class BadTarget(ValueError):
    """A ``MODULE:FUNC`` that is malformed, cannot be imported, is not an async function, or
    does not take the task's arguments."""


def check_target(target: str) -> str:
    """``target`` if it is shaped ``module.path:function``; BadTarget otherwise."""
    if not isinstance(target, str) or not _TARGET.match(target):
        raise BadTarget(f"task target {target!r}: must be MODULE:FUNC, e.g. 'stages:pipeline'")
    return target


def resolve(
    target: str, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None
) -> TaskFunction:
    """Import ``module:function`` and check that it takes the context, ``args`` and
    ``kwargs``; a one-line BadTarget if anything is off (never retried: it cannot get better)."""
    module_name, _, attr = check_target(target).partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # any import failure is the module's
        raise BadTarget(f"task target {target!r}: cannot import {module_name}: {e!r}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise BadTarget(f"task target {target!r}: {module_name} has no {attr}") from None
    if not callable(obj):
        raise BadTarget(f"task target {target!r}: {type(obj).__name__} is not callable")
    if not (
        inspect.iscoroutinefunction(obj)
        or inspect.iscoroutinefunction(getattr(obj, "__call__", None))  # noqa: B004
    ):
        raise BadTarget(
            f"task target {target!r}: not an async function (define it `async def f(ctx, ...)`)"
        )
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # no signature to check: the call will tell
        signature = None
    if signature is not None:
        try:
            signature.bind(None, *args, **(kwargs or {}))
        except TypeError as e:
            raise BadTarget(
                f"task target {target!r}: its arguments do not fit {attr}{signature}: {e}"
            ) from None
    fn: TaskFunction = obj
    return fn


def failure(attempt: int, exc: BaseException) -> Outcome:
    """The outcome of an attempt that raised ``exc``."""
    lines = str(exc).strip().splitlines()
    message = lines[0] if lines else ""
    return Outcome(
        attempt,
        error_type=type_name(type(exc)),
        error_mro=tuple(type_name(c) for c in type(exc).__mro__),
        message=message,
    )


async def run_attempt(
    fn: TaskFunction, ctx: TaskContext, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> Outcome:
    """Run ``fn(ctx, *args, **kwargs)``; commit pending steps whatever happens, then record and
    return the outcome. Cancellation is not an outcome: it propagates (nothing is recorded)."""
    try:
        value = await fn(ctx, *args, **kwargs)
        data = encode(value, "result")
        await ctx.checkpoint()
    except trio.Cancelled:
        raise
    except Exception as exc:  # any task error is an outcome
        traceback.print_exc()
        outcome = failure(ctx.attempt, exc)
        with contextlib.suppress(Exception):  # the steps done before the error stay done
            await ctx.checkpoint()
    else:
        outcome = Outcome(ctx.attempt, value=data)
    await ctx.record(outcome)
    return outcome
