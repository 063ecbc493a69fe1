"""Marks tests by folder: tests/integration -> integration, tests/gpu -> gpu (skipped without CUDA)."""
import pathlib

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = pathlib.Path(str(item.fspath)).parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        if "gpu" in parts:
            item.add_marker(pytest.mark.gpu)
