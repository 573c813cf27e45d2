"""Progress output that suits where it goes: a tqdm bar on a terminal, a log line per stage elsewhere.

A job's output is a log file (``ray job logs``), where tqdm's carriage-return frames pile up into tens
of kilobytes of redrawn bars. There, ``progress`` writes one line when a stage ends (``train score net:
2000/2000 steps in 1m 23s, 24.1 steps/s, loss=0.0312``), and one a minute while a long stage runs, through
the ``ray_ad.progress`` logger at INFO. Library code logs; the CLI and the jobs call ``configure_logging``
once so that these lines (and every other ``ray_ad`` INFO line) reach their stdout.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

LINE_INTERVAL = 60.0  # seconds between interim lines of a stage that is still running


def on_terminal() -> bool:
    """Whether a redrawn bar has somewhere to be redrawn: tqdm's stream (stderr) is a terminal, or this
    runs in a notebook kernel."""
    try:
        if sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):  # replaced or closed stream
        return False
    return _in_notebook()


def _in_notebook() -> bool:
    if "IPython" not in sys.modules:
        return False
    try:
        shell = sys.modules["IPython"].get_ipython()
        return shell is not None and "IPKernelApp" in shell.config
    except Exception:  # noqa: BLE001 - any IPython oddity just means "not a notebook"
        return False


def progress(
    iterable: Iterable[Any] | None = None, desc: str = "", total: int | None = None, enabled: bool = True,
    unit: str = "it", initial: int = 0, interval: float = LINE_INTERVAL, **tqdm_options: Any,
) -> Any:
    """Progress over ``iterable`` (or a manual counter: ``update(n)``, ``set_postfix``, ``close``).

    ``enabled=False``: silent. On a terminal: a tqdm bar (``tqdm_options`` such as ``leave`` go to it).
    Otherwise: a ``StageLine``, one log line per stage with counts, time and rate.
    """
    if not enabled:
        return tqdm(iterable, desc=desc, total=total, initial=initial, unit=unit, disable=True)
    if on_terminal():
        return tqdm(iterable, desc=desc, total=total, initial=initial, unit=unit, **tqdm_options)
    return StageLine(iterable, desc, total, unit, initial, interval)


class StageLine:
    """The part of tqdm's interface this project uses, written as log lines instead of bar frames."""

    def __init__(
        self, iterable: Iterable[Any] | None = None, desc: str = "", total: int | None = None, unit: str = "it",
        initial: int = 0, interval: float = LINE_INTERVAL,
    ) -> None:
        self.iterable, self.desc, self.unit, self.interval = iterable, desc, unit, interval
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.total, self.n, self.initial = total, initial, initial
        self.postfix = ""
        self.start = self.last_line = time.monotonic()
        self.closed = False

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError(f"progress {self.desc!r} has no total")
        return self.total

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("a progress counter without an iterable cannot be iterated; call update()")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> StageLine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.interval and now - self.last_line >= self.interval and not self.closed:
            self.last_line = now
            log.info("%s ...", self.line(now))

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **values: Any) -> None:
        values = {**(ordered_dict or {}), **values}
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        """tqdm redraws here; a log has nothing to redraw."""

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            log.info("%s", self.line(time.monotonic()))

    def line(self, now: float) -> str:
        """``desc: n/total unit in T, R unit/s[, postfix]`` (``(from I)`` when a resumed stage started at I)."""
        elapsed = now - self.start
        done = self.n - self.initial
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        resumed = f" (from {self.initial})" if self.initial else ""
        rate = f", {done / elapsed:.3g} {self.unit}/s" if elapsed > 0 and done > 0 else ""
        postfix = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc or 'progress'}: {count} {self.unit}{resumed} in {_duration(elapsed)}{rate}{postfix}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (pytest and Ray swap it), never a stale stream."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ / setStream assign it; stdout is kept
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """``ray_ad`` log records at ``level`` and above to stdout, message only (for the CLI and the jobs).

    Only the ``ray_ad`` logger is configured (other libraries keep their own levels); records still
    propagate to the root logger's handlers, if any. Calling it again changes nothing but the level.
    """
    logger = logging.getLogger("ray_ad")
    logger.setLevel(level)
    if not any(isinstance(handler, _StdoutHandler) for handler in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
