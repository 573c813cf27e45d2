"""Progress output: bars on a terminal, one log line per stage in a job's log; logging for jobs and CLI."""

from __future__ import annotations

import logging

import pytest
from tqdm.auto import tqdm

from ray_ad import progress as progress_module
from ray_ad.progress import StageLine, configure_logging, progress


@pytest.fixture
def no_terminal(monkeypatch):
    monkeypatch.setattr(progress_module, "on_terminal", lambda: False)


def test_off_a_terminal_a_stage_is_one_line_with_count_time_and_rate(no_terminal, caplog):
    caplog.set_level(logging.INFO, logger="ray_ad.progress")
    bar = progress(range(5), desc="train features", unit="batches")
    assert isinstance(bar, StageLine) and len(bar) == 5
    assert list(bar) == [0, 1, 2, 3, 4]
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("train features: 5/5 batches in ") and "\r" not in line


def test_a_counter_logs_its_postfix_and_where_a_resumed_stage_started(no_terminal, caplog):
    caplog.set_level(logging.INFO, logger="ray_ad.progress")
    with progress(desc="train score net", total=30, initial=10, unit="steps") as bar:
        bar.update(15)
        bar.set_postfix(loss="0.0312")
        bar.update(5)
    bar.close()  # closing twice writes one line
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("train score net: 30/30 steps (from 10) in ") and line.endswith(", loss=0.0312")


def test_a_long_stage_writes_an_interim_line_per_interval(no_terminal, caplog):
    caplog.set_level(logging.INFO, logger="ray_ad.progress")
    bar = progress(desc="score", total=3, interval=1e-9)
    bar.update(1)
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("score: 1/3 it") and lines[0].endswith(" ...")


def test_a_terminal_gets_tqdm_and_disabled_progress_says_nothing(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="ray_ad.progress")
    monkeypatch.setattr(progress_module, "on_terminal", lambda: True)
    bar = progress(range(3), desc="x", leave=False)
    assert isinstance(bar, tqdm) and not bar.disable
    bar.close()
    monkeypatch.setattr(progress_module, "on_terminal", lambda: False)
    quiet = progress(range(3), desc="x", enabled=False)
    assert list(quiet) == [0, 1, 2]
    quiet.update(1)
    quiet.set_postfix(loss=1)
    quiet.close()
    assert not caplog.records


def test_configure_logging_sends_ray_ad_info_lines_to_stdout_once(capsys):
    logger = logging.getLogger("ray_ad")
    before = (logger.level, list(logger.handlers))
    try:
        configure_logging()
        configure_logging()  # idempotent: one handler, one line
        logging.getLogger("ray_ad.tuning").info("sweep t: 3 fit")
        logging.getLogger("elsewhere").info("not ours")
        out = capsys.readouterr().out
        assert out == "sweep t: 3 fit\n"
    finally:
        logger.setLevel(before[0])
        logger.handlers[:] = before[1]
