from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from lc_onnx.torch.data.datasets import digits  # noqa: E402


def test_digits_split_is_fixed_and_upsampled():
    splits = digits(16)
    assert (len(splits.train), len(splits.test), splits.num_classes) == (1437, 360, 10)
    x, y = splits.test[0]
    assert x.shape == (3, 16, 16)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert torch.equal(digits(16).test.tensors[1], splits.test.tensors[1])
