from __future__ import annotations

import pytest

pytest.importorskip("torch")

from lc_onnx.torch.finetune.schedule import Schedule  # noqa: E402


def test_schedule_extends_only_when_stage_collapsed():
    schedule = Schedule([f"b{i}" for i in range(6)], [0.5, 1.0])
    assert schedule.targets() == ["b3", "b4", "b5"]
    assert schedule.advance({"b4", "b5"}) == []
    assert schedule.advance({"b3", "b4", "b5"}) == ["b0", "b1", "b2"]
    assert schedule.stage == 1
    assert schedule.advance({f"b{i}" for i in range(6)}) == []
