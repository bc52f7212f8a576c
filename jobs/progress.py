"""Progress of long jobs (eval.py, study.py) counted in units of work, with an ETA and a one-line estimate.

A bar that counts batches says nothing while one batch runs for minutes; this one counts the work
itself (image-steps of a search, images of a map) and estimates the time left per kind of work
from the rate measured on this machine: a kind's first update (the first call compiles or warms
caches) and later stalls (a recompilation) are left out of its rate.
"""

from __future__ import annotations

import logging
import time
from typing import Mapping

__all__ = ["WorkProgress", "format_duration"]


def format_duration(seconds: float) -> str:
    """Seconds -> '45 s', '12 min', '2.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class _Kind:
    """Work of one kind: done, and the (work, seconds) of its timed updates."""

    #: An update that took this many times the median of the earlier ones is a stall (a
    #: recompilation, a cache write): its work counts as done but not in the rate.
    STALL = 10.0

    def __init__(self, total: float) -> None:
        self.total, self.done = float(total), 0.0
        self.warmed = False  # the first update (compilation, caches) is never timed
        self.work, self.seconds, self.intervals = 0.0, 0.0, []
        self.estimated = False

    def add(self, n: float, dt: float) -> None:
        if not self.warmed:
            self.warmed = True
            return
        if len(self.intervals) >= 3 and dt > self.STALL * sorted(self.intervals)[len(self.intervals) // 2]:
            return
        self.intervals.append(dt)
        self.work += n
        self.seconds += dt

    def rate(self) -> float | None:
        return self.work / self.seconds if self.work > 0 and self.seconds > 0 else None


class WorkProgress:
    """A tqdm bar over several kinds of work with an ETA per kind, and one estimate log line per kind.

    Args:
        totals: units of work per kind, e.g. ``{"paper search": 90000, "alma": 100000}`` (image-steps).
        desc: bar label.
        unit: the unit's name (shown in the bar and the estimate).
        log: where the estimate lines go.
        hint: appended to an estimate above ``long_seconds`` (how to get a quick look instead).
        estimate_after: seconds of timed work of a kind before its estimate is logged.
        long_seconds: an estimate above this gets the hint.
        enabled: show the bar (the estimate lines are logged either way).
    """

    def __init__(self, totals: Mapping[str, float], *, desc: str, unit: str, log: logging.Logger, hint: str = "",
                 estimate_after: float = 5.0, long_seconds: float = 300.0, enabled: bool = True) -> None:
        from tqdm.auto import tqdm

        self.kinds = {k: _Kind(v) for k, v in totals.items()}
        self.unit, self.log, self.hint = unit, log, hint
        self.estimate_after, self.long_seconds = estimate_after, long_seconds
        self.last = time.time()
        self.bar = tqdm(total=int(sum(totals.values())), desc=desc, unit=f" {unit}", unit_scale=True, dynamic_ncols=True,
                        disable=not enabled, postfix="ETA after warm-up",
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt}{unit} [{elapsed}{postfix}]")

    def skip(self, kind: str, n: float) -> None:
        """``n`` units of ``kind`` need no work (cached, or nothing to search): done, not timed."""
        k = self.kinds[kind]
        n = min(n, k.total - k.done)
        k.done += n
        self.bar.update(round(n))
        self.last = time.time()  # reading a cache is no computation
        self._refresh()

    def advance(self, kind: str, n: float, *, upto: float | None = None) -> None:
        """``n`` units of ``kind`` were computed since the last update (the first update of a kind is its warm-up).

        ``upto`` caps the kind's done count (the end of the current batch), for counts that can
        overshoot, such as forward passes of an attack that also runs a few extra ones.
        """
        k, now = self.kinds[kind], time.time()
        n = max(0.0, min(n, k.total - k.done, (upto if upto is not None else k.total) - k.done))
        # Work runs one kind at a time: this update took the time since the previous one of any kind.
        k.add(n, now - self.last)
        self.last = now
        k.done += n
        self.bar.update(round(n))
        if not k.estimated and k.seconds >= self.estimate_after:
            k.estimated = True
            self._log_estimate(kind)
        self._refresh()

    def finish(self, kind: str, target: float, *, timed: bool = True) -> None:
        """Bring ``kind``'s done count up to ``target`` (an exact count at the end of a batch).

        ``timed``: the gap was computed just now (e.g. a search's images failing unperturbed,
        counted at the end); else it needed no work (cached) and stays out of the rate.
        """
        gap = max(0.0, target - self.kinds[kind].done)
        if timed:
            self.advance(kind, gap, upto=target)
        elif gap > 0:
            self.skip(kind, gap)

    def remaining_seconds(self) -> tuple[float, list[str]]:
        """(seconds left over the kinds with a measured rate, names of kinds with work left and no rate yet)."""
        seconds, unknown = 0.0, []
        for name, k in self.kinds.items():
            left = k.total - k.done
            if left <= 0:
                continue
            rate = k.rate()
            if rate is None:
                unknown.append(name)
            else:
                seconds += left / rate
        return seconds, unknown

    def _log_estimate(self, kind: str) -> None:
        k = self.kinds[kind]
        rate = k.rate() or 0.0
        left = (k.total - k.done) / rate if rate > 0 else float("inf")
        total, unknown = self.remaining_seconds()
        rest = f"; not yet timed: {', '.join(unknown)}" if unknown else ""
        msg = (f"estimate: {kind} about {format_duration(left)} more on this machine ({rate:.0f} {self.unit}/s); "
               f"everything timed so far about {format_duration(total)} more{rest}")
        if total > self.long_seconds and self.hint:
            msg += f". {self.hint}"
        self.log.info(msg)

    def _refresh(self) -> None:
        seconds, unknown = self.remaining_seconds()
        text = f"ETA {format_duration(seconds)}" + (" + untimed" if unknown else "")
        self.bar.set_postfix_str(text if seconds > 0 or not unknown else "ETA after warm-up", refresh=False)

    def close(self) -> None:
        self.bar.close()
