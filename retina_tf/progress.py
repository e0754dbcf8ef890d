"""Progress of the loops over images, as plain log lines::

    evaluate: 5/20 images (21_training.tif), 0:41 elapsed, ~2:03 left

Lines go through ``logging`` (a terminal, a log file and CI read the same): one per item, or
one every 2nd, 5th, 10th, ... item while items take under :data:`EVERY_S` seconds, none for a
loop done within :data:`EVERY_S`; and one whenever a single item has run :data:`HEARTBEAT_S`
seconds with nothing logged (a large image with sliding-window TTA): no loop is silent long.
``keras.utils.Progbar`` does not fit: it writes ANSI bar updates to stdout itself, treats every
POSIX process as a terminal and shows no item names.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

EVERY_S = 2.0  # items faster than this share a line
HEARTBEAT_S = 30.0  # a line when one item has run this long with nothing logged


def duration(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour on.

    >>> duration(41), duration(123.4), duration(3725)
    ('0:41', '2:03', '1:02:05')
    """
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _step(items_per_line: float) -> int:
    """A round stride (1, 2, 5, 10, 20, ...) of at least ``items_per_line``: regular counts."""
    step = 1
    while step < items_per_line:
        step = step * 5 // 2 if str(step)[0] == "2" else step * 2
    return step


def progress(items: Iterable[T], what: str, unit: str = "images",
             name: Callable[[T], str] = str, names: Sequence[str] | None = None,
             level: int = logging.INFO, every: float | None = None,
             heartbeat: float | None = None) -> Iterator[T]:
    """Yields ``items`` and logs ``<what>: n/N <unit> (<name>), <elapsed> elapsed,
    ~<left> left`` as each one is done, at ``level`` (DEBUG: only the heartbeat shows, at
    INFO). An item's name is ``name(item)``, or ``names[i]`` when given. ``every`` /
    ``heartbeat`` default to :data:`EVERY_S` / :data:`HEARTBEAT_S` (``every=0``: a line per
    item; ``heartbeat=0``: none)."""
    items = list(items)
    total = len(items)
    every = EVERY_S if every is None else every
    heartbeat = HEARTBEAT_S if heartbeat is None else heartbeat
    start = time.monotonic()
    # done, name of the running item, its start, time of the last line: read by the watcher
    state = [0, "", start, start]
    stop = threading.Event()

    def left(done: int, now: float) -> str:
        return f", ~{duration((now - start) / done * (total - done))} left" if done else ""

    def watch() -> None:
        while not stop.wait(min(heartbeat, 5.0)):
            done, current, began, last = state
            now = time.monotonic()
            # the gaps grow with a long item's time, up to 4 heartbeats: few lines for an hour
            if now - last >= max(heartbeat, min((now - began) / 2, 4 * heartbeat)):
                state[3] = now
                log.info(f"{what}: {done}/{total} {unit}, {current} running for "
                         f"{duration(now - began)}" + (f"; {duration(now - start)} elapsed"
                                                       f"{left(done, now)}" if done else ""))

    watcher = None
    if heartbeat > 0 and total:
        watcher = threading.Thread(target=watch, name=f"progress: {what}", daemon=True)
        watcher.start()
    try:
        for done, item in enumerate(items, 1):
            state[1] = names[done - 1] if names is not None else name(item)
            state[2] = time.monotonic()
            yield item
            now = time.monotonic()
            state[0] = done
            if now - start >= every and (done == total or
                                         done % _step(every * done / max(now - start, 1e-9)) == 0):
                if log.isEnabledFor(level):  # a hidden line does not end a silence
                    state[3] = now
                log.log(level, f"{what}: {done}/{total} {unit} ({state[1]}), "
                               f"{duration(now - start)} elapsed"
                               f"{left(done, now) if done < total else ''}")
    finally:
        stop.set()
        if watcher is not None:  # no heartbeat after the loop (bounded: never hang an exit)
            watcher.join(timeout=1.0)
