"""Terminal output helpers: rich progress bars and tables on stderr/stdout."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
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
    said = (-1, "")  # the (count, description) of the last line printed: the closing line is not a repeat

    def line(now: float) -> str:
        rate = done / max(now - start, 1e-9)
        eta = f", ETA {_clock((total - done) / rate)}" if rate > 0 and done < total else ""
        return f"{desc}: {done}/{total} ({rate:.3g}/s, {_clock(now - start)} elapsed{eta})"

    def tick(advance: int = 1, description: str | None = None) -> None:
        nonlocal done, last, desc, said
        done += advance
        desc = description or desc
        now = time.monotonic()
        if now - last >= PLAIN_EVERY_S:
            last, said = now, (done, desc)
            print(line(now), file=sys.stderr, flush=True)

    yield tick
    # a short step stays quiet; a step whose last tick was printed is not printed twice
    if time.monotonic() - start >= PLAIN_EVERY_S and said != (done, desc):
        print(line(time.monotonic()), file=sys.stderr, flush=True)


_PROGRESS = [False]  # the process's default: the CLI turns it on, the Python API leaves it off


def show_progress(on: bool = True) -> None:
    """Turn progress on (or off) for every step that does not say otherwise: calibration, reconstruction, each
    step of a stack, the export. The CLI turns it on; a library caller may."""
    _PROGRESS[0] = on


def progress_on(enabled: bool | None = None) -> bool:
    """``enabled``, or (None) the process's default (see :func:`show_progress`)."""
    return _PROGRESS[0] if enabled is None else enabled


@contextlib.contextmanager
def progress_bar(enabled: bool | None, total: int, label: str) -> Iterator[Callable[..., None]]:
    """Yield ``tick(advance=1, description=None)``. When ``enabled`` (None: the process's default, see
    :func:`show_progress`): a transient rich bar on stderr where stderr is a terminal, else a plain line every few
    seconds (what a log file or CI can read)."""
    if not progress_on(enabled):
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


@contextlib.contextmanager
def step(label: str) -> Iterator[None]:
    """One opaque long step (an export, a trace), when progress is on (:func:`show_progress`): a line once it has
    run for :data:`PLAIN_EVERY_S` seconds, and one with its time when it ends. A short step, or one that fails
    early (its error is then the only line), stays quiet."""
    if not _PROGRESS[0]:
        yield
        return
    start = time.monotonic()
    running = threading.Timer(PLAIN_EVERY_S, lambda: print(f"{label} ...", file=sys.stderr, flush=True))
    running.daemon = True
    running.start()
    try:
        yield
    finally:
        running.cancel()
    if time.monotonic() - start >= PLAIN_EVERY_S:
        print(f"{label}: done in {_clock(time.monotonic() - start)}", file=sys.stderr, flush=True)


def tracked(items: Iterable[Any], total: int, label: str) -> Iterator[Any]:
    """``items``, with a progress bar (the process's default, :func:`show_progress`) ticking once per item."""
    with progress_bar(None, total, label) as tick:
        for item in items:
            yield item
            tick()


_RESUMABLE: list[Callable[[], str]] = []  # what the running command has kept so far, for the Ctrl-C line
_KEPT_AT_INTERRUPT: list[str] = []  # said by the innermost resumable step a Ctrl-C left


@contextlib.contextmanager
def resumable(describe: Callable[[], str]) -> Iterator[None]:
    """While a resumable step runs, ``describe()`` says what it has kept (e.g. "3 of 9 points finished in DIR"):
    an interrupted command prints it with how to resume."""
    _RESUMABLE.append(describe)
    try:
        yield
    except KeyboardInterrupt:
        if not _KEPT_AT_INTERRUPT:  # the innermost step speaks (Typer turns the interrupt into exit code 130)
            _KEPT_AT_INTERRUPT.append(_said(describe) or "")
        raise
    finally:
        _RESUMABLE.remove(describe)


def _said(describe: Callable[[], str]) -> str | None:
    try:
        return describe()
    except Exception:  # noqa: BLE001 - a description must never turn Ctrl-C into a traceback
        return None


def interrupted_line() -> str:
    """The one line a Ctrl-C prints: what finished, and that a re-run resumes (or that nothing was written)."""
    kept = _KEPT_AT_INTERRUPT.pop() if _KEPT_AT_INTERRUPT else \
        next((k for k in map(_said, reversed(_RESUMABLE)) if k), None)
    _KEPT_AT_INTERRUPT.clear()
    if kept:
        return f"interrupted: {kept}; re-run the same command to resume"
    return "interrupted: nothing was written (outputs are written whole, at the end)"
