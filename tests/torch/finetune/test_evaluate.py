from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("onnxruntime")

from torch.utils.data import TensorDataset  # noqa: E402

from lc_onnx.errors import UserError  # noqa: E402
from lc_onnx.torch import export_onnx  # noqa: E402
from lc_onnx.torch.finetune.evaluate import accuracy, onnx_predict, torch_predict  # noqa: E402
from tests.torch import nets  # noqa: E402


def test_accuracy_counts_top1_over_batches():
    labels = torch.tensor([0, 1, 2, 1, 0])
    guesses = np.array([0, 1, 0, 1, 2])  # 3 of 5 right
    dataset = TensorDataset(torch.arange(5), labels)

    def predict(x: torch.Tensor) -> np.ndarray:  # numpy logits, as onnxruntime returns them
        return np.eye(3, dtype=np.float32)[guesses[x.numpy()]]

    assert accuracy(predict, dataset, batch_size=2) == 60.0


def test_torch_and_onnxruntime_predictions_agree_on_the_export(tmp_path):
    model = nets.randomise(nets.vgg()).train()
    x = nets.images(40, seed=3)
    predict = torch_predict(model)
    with torch.no_grad():
        labels = model.eval()(x).argmax(1)
    model.train()
    dataset = TensorDataset(x, labels)  # the model's own eval-mode answers: 100 % in torch
    assert accuracy(predict, dataset) == 100.0
    assert model.training  # restored after every batch
    path = export_onnx(model, x[:2], tmp_path / "m.onnx")
    assert accuracy(onnx_predict(path), dataset) == 100.0


def test_onnx_predict_of_a_bad_file_is_a_user_error(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(UserError, match="onnxruntime cannot load m.onnx"):
        onnx_predict(path)
