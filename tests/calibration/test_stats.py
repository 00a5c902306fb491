"""Streaming statistics and fits against an independent numpy least-squares fit."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

import lc_onnx
from lc_onnx.calibration.stats import Moments
from tests.calibration.models import act_numpy, feeds, mlp

ort_quant = pytest.importorskip("onnxruntime.quantization")


@pytest.mark.parametrize(
    "act",
    [0.85, np.linspace(0.8, 0.95, 24), "Gelu", "Silu", "Tanh"],
    ids=["prelu", "prelu-channels", "gelu", "silu", "tanh"],
)
def test_fit_equals_numpy_lstsq_per_channel(act):
    model = mlp([act], [6, 24, 3])
    data = feeds(model, batches=5)
    fit = lc_onnx.calibrate(model, data).fits["act0"]
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    x = np.concatenate([f["x"] for f in data]).astype(np.float64)
    h = x @ inits["fc0.weight"].T + inits["fc0.bias"]
    y = act_numpy(act, h)
    for j in range(h.shape[1]):
        design = np.stack([h[:, j], np.ones(len(h))], axis=1)
        (a, c), *_ = np.linalg.lstsq(design, y[:, j], rcond=None)
        assert fit.scale[j] == pytest.approx(a, rel=1e-5, abs=1e-6)
        assert fit.shift[j] == pytest.approx(c, rel=1e-5, abs=1e-6)
    residual = y - (fit.scale * h + fit.shift)
    assert fit.fit_error == pytest.approx(np.linalg.norm(residual) / np.linalg.norm(y), rel=1e-4, abs=1e-7)
    assert fit.rows == len(x)


def test_moments_are_the_same_for_1_or_10_batches():
    rng = np.random.default_rng(0)
    h = 3.0 + rng.standard_normal((1000, 7))
    y = np.tanh(h) + 0.1 * rng.standard_normal((1000, 7))
    one, ten = Moments(7), Moments(7)
    one.update(h, y)
    for hb, yb in zip(np.array_split(h, 10), np.array_split(y, 10)):
        ten.update(hb, yb)
    assert one.n == ten.n == 1000
    for name in ("mean_h", "mean_y", "m2_h", "m2_y", "c_hy"):
        np.testing.assert_allclose(getattr(one, name), getattr(ten, name), rtol=1e-12)
    for a, b in zip(one.fit(), ten.fit()):
        np.testing.assert_allclose(a, b, rtol=1e-10)


def test_fits_through_onnxruntime_do_not_depend_on_batching():
    model = mlp(["Gelu"], [6, 16, 3])
    data = feeds(model, batches=10, rows=8)
    whole = [{"x": np.concatenate([f["x"] for f in data])}]
    a, b = lc_onnx.calibrate(model, data).fits["act0"], lc_onnx.calibrate(model, whole).fits["act0"]
    np.testing.assert_allclose(a.scale, b.scale, rtol=1e-10)
    np.testing.assert_allclose(a.shift, b.shift, rtol=1e-10, atol=1e-14)
    assert a.rows == b.rows == 80


def test_calibration_data_reader_and_generator_give_the_same_fits():
    model = mlp([0.9, "Gelu"], [6, 16, 16, 3])
    data = feeds(model, batches=4)

    class Reader(ort_quant.CalibrationDataReader):
        def __init__(self):
            self.it = iter(data)

        def get_next(self):
            return next(self.it, None)

    from_reader = lc_onnx.calibrate(model, Reader())
    from_generator = lc_onnx.calibrate(model, (f for f in data))
    assert from_reader.fits.keys() == from_generator.fits.keys() == {"act0", "act1"}
    for key in from_reader.fits:
        assert from_reader.fits[key].to_dict() == from_generator.fits[key].to_dict()


def test_constant_channel_gets_the_mean_and_no_slope():
    m = Moments(2)
    h = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    m.update(h, np.tanh(h))
    a, c, sse = m.fit()
    assert a[1] == 0.0 and c[1] == pytest.approx(np.tanh(5.0)) and sse[1] == pytest.approx(0.0, abs=1e-20)
    assert a[0] > 0


def test_fits_file_round_trips_exactly(tmp_path):
    model = mlp(["Gelu"], [6, 16, 3])
    cal = lc_onnx.calibrate(model, feeds(model, 2), output=tmp_path / "fits.json")
    back = lc_onnx.calibration.load_fits(tmp_path / "fits.json")
    assert back.batches == 2
    np.testing.assert_array_equal(back.fits["act0"].scale, cal.fits["act0"].scale)
    np.testing.assert_array_equal(back.fits["act0"].shift, cal.fits["act0"].shift)
