"""WorkProgress: counts work, estimates the time left per kind from the measured rate, says so once."""

from __future__ import annotations

import logging

import pytest

from jobs import progress as progress_mod
from jobs.progress import WorkProgress, format_duration


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_estimate_from_the_rate_after_warm_up_with_hint(monkeypatch, caplog):
    clock = Clock()
    monkeypatch.setattr(progress_mod.time, "time", clock)
    log = logging.getLogger("test.progress")
    p = WorkProgress({"search": 10_000, "alma": 5_000}, desc="t", unit="image-step", log=log, hint="HINT",
                     estimate_after=5.0, long_seconds=60.0, enabled=False)
    with caplog.at_level(logging.INFO, logger="test.progress"):
        p.advance("search", 100)  # warm-up (compiles): not in the rate
        clock.t += 20.0
        p.advance("search", 100)  # 100 image-steps in 20 s -> 5 / s: the estimate
        clock.t += 20.0
        p.advance("search", 100)  # the same rate; logged once only
    (line,) = [r.getMessage() for r in caplog.records]
    # 9,800 left at 5 / s = 1,960 s; the cross-check is not timed yet; long, so the hint follows.
    assert "search about 33 min more" in line and "5 image-step/s" in line and "not yet timed: alma" in line
    assert line.endswith("HINT")
    seconds, unknown = p.remaining_seconds()
    assert seconds == pytest.approx(9_700 / 5) and unknown == ["alma"]
    # Cached work is done but not timed: it shortens the ETA without changing the rate.
    p.skip("search", 4_700)
    assert p.remaining_seconds()[0] == pytest.approx(5_000 / 5)
    # upto caps an overshooting count at the end of the current batch; the estimate is logged once.
    with caplog.at_level(logging.INFO, logger="test.progress"):
        p.advance("alma", 10, upto=100)
        clock.t += 6.0
        p.advance("alma", 500, upto=100)
    assert p.kinds["alma"].done == 100 and len(caplog.records) == 2
    p.close()


def test_short_work_gets_no_hint(monkeypatch, caplog):
    clock = Clock()
    monkeypatch.setattr(progress_mod.time, "time", clock)
    log = logging.getLogger("test.progress2")
    p = WorkProgress({"search": 1_000}, desc="t", unit="image-step", log=log, hint="HINT", estimate_after=5.0,
                     long_seconds=300.0, enabled=False)
    with caplog.at_level(logging.INFO, logger="test.progress2"):
        p.advance("search", 10)
        clock.t += 6.0
        p.advance("search", 60)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "HINT" not in line and "search about 2 min more" in line  # 930 left at 10 / s


def test_a_stall_is_left_out_of_the_rate(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress_mod.time, "time", clock)
    p = WorkProgress({"search": 10_000}, desc="t", unit="image-step", log=logging.getLogger("t3"), enabled=False)
    p.advance("search", 10)  # warm-up
    for dt in (1.0, 1.0, 1.0, 100.0, 1.0):  # a recompilation in the middle
        clock.t += dt
        p.advance("search", 10)
    k = p.kinds["search"]
    assert k.done == 60 and k.rate() == pytest.approx(10.0)


@pytest.mark.parametrize("s, text", [(45, "45 s"), (720, "12 min"), (9000, "2.5 h")])
def test_format_duration(s, text):
    assert format_duration(s) == text
