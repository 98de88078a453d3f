"""Terminal output helpers: rich progress bars and tables on stderr/stdout."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_LIVE: list[tuple[Progress, Any]] = []  # the rich bar on screen (and its task), for the steps nested inside it

PLAIN_EVERY_S = 10.0
"""How often a progress line is printed where stderr is not a terminal (a pipe, a log file, CI)."""


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


@contextlib.contextmanager
def _plain_progress(total: int, label: str) -> Iterator[Callable[..., None]]:
    """Plain lines on stderr (no ANSI codes) every :data:`PLAIN_EVERY_S` seconds, and one at the end."""
    start = last = time.monotonic()
    done = 0
    desc = label

    def line(now: float) -> str:
        rate = done / max(now - start, 1e-9)
        eta = f", ETA {_clock((total - done) / rate)}" if rate > 0 and done < total else ""
        return f"{desc}: {done}/{total} ({rate:.3g}/s, {_clock(now - start)} elapsed{eta})"

    def tick(advance: int = 1, description: str | None = None) -> None:
        nonlocal done, last, desc
        done += advance
        desc = description or desc
        now = time.monotonic()
        if now - last >= PLAIN_EVERY_S:
            last = now
            print(line(now), file=sys.stderr, flush=True)

    yield tick
    if time.monotonic() - start >= PLAIN_EVERY_S:  # a short step stays quiet
        print(line(time.monotonic()), file=sys.stderr, flush=True)


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, label: str) -> Iterator[Callable[..., None]]:
    """Yield ``tick(advance=1, description=None)``. When ``enabled``: a transient rich bar on stderr where stderr
    is a terminal, else a plain line every few seconds (what a log file or CI can read)."""
    if not enabled:
        yield lambda advance=1, description=None: None
        return
    if not sys.stderr.isatty():
        with _plain_progress(total, label) as tick:
            yield tick
        return
    if _LIVE:  # rich shows one live display at a time: a step inside another shows as a task of its bar
        bar, _ = _LIVE[-1]
        task = bar.add_task(label, total=total)
        try:
            yield lambda advance=1, description=None: bar.update(
                task, advance=advance, **({"description": description} if description else {}))
        finally:
            bar.remove_task(task)
        return

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)

        def tick(advance: int = 1, description: str | None = None) -> None:
            bar.update(task, advance=advance, **({"description": description} if description else {}))

        _LIVE.append((bar, task))
        try:
            yield tick
        finally:
            _LIVE.pop()
