"""Fixtures the deploy tests share."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from lc_onnx.model.demo import build_demo_model


@pytest.fixture
def demo_model(tmp_path) -> Path:
    """The embedded demo model saved as `demo.onnx` (the repository takes its name from the file)."""
    path = tmp_path / "demo.onnx"
    onnx.save(build_demo_model(), path)
    return path
