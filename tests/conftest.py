"""Marks tests by folder (tests/integration -> integration, tests/gpu -> gpu, skipped without CUDA),
and lists the figures tests measured at the end of the run, which `pytest -q` would otherwise hide."""
import pathlib

import pytest

_MEASURED = pytest.StashKey[list]()


def pytest_configure(config):
    config.stash[_MEASURED] = []


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = pathlib.Path(str(item.fspath)).parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        if "gpu" in parts:
            item.add_marker(pytest.mark.gpu)


@pytest.fixture
def measured(request):
    """measured(text): a figure this test measured (timings, counts), listed under "measured" in the
    run's summary with the test's id, so CI's output carries the fault, fuzz and overload results."""
    def record(text: str) -> None:
        request.config.stash[_MEASURED].append(f"{request.node.nodeid}: {text}")
    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = config.stash.get(_MEASURED, [])
    if lines:
        terminalreporter.section("measured")
        for line in lines:
            terminalreporter.write_line(line)
