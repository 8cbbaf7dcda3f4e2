"""Collects each benchmark's mean time so the summary can print ratios measured in the same run."""
import os
import platform

import pytest
import torch

_TIMES: dict[str, float] = {}
_RATIOS: list[tuple[str, str, str, float]] = []


@pytest.fixture(scope="session")
def record():
    """record(name, benchmark): remember the mean seconds of a finished benchmark under `name`."""
    def _record(name, benchmark, per=1):
        _TIMES[name] = benchmark.stats.stats.mean / per
    return _record


@pytest.fixture(scope="session")
def ratio():
    """ratio(label, slow, fast, scale=1): report scale * slow / fast once both were recorded
    (scale: e.g. 1000 when `slow` was recorded per step of a 1000-step round)."""
    def _ratio(label, slow, fast, scale=1):
        _RATIOS.append((label, slow, fast, scale * _TIMES[slow] / _TIMES[fast]))
    return _ratio


def machine() -> str:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {dev}"


def pytest_terminal_summary(terminalreporter):
    if not _TIMES:
        return
    tr = terminalreporter
    tr.section("per-call times (mean) and ratios")
    tr.write_line(f"machine: {machine()}")
    for name, t in _TIMES.items():
        tr.write_line(f"  {name:<48s} {t * 1e3:10.3f} ms")
    for label, slow, fast, r in _RATIOS:
        tr.write_line(f"  {label:<48s} {r:10.1f}x  ({slow} / {fast})")
