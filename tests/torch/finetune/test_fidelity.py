"""Distillation losses and fidelity measures, against numpy computed independently."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lc_onnx.errors import UserError  # noqa: E402
from lc_onnx.torch.finetune.fidelity import distill_loss, kl_divergence, mean_pool, pooled_cosine, token_mse  # noqa: E402


def tensors(seed: int = 0):
    rng = np.random.default_rng(seed)
    s, t = rng.standard_normal((3, 5, 4)), rng.standard_normal((3, 5, 4))
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    return s, t, mask


def np_pool(h, mask):
    return (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)


def test_mean_pool_and_cosine_skip_padded_tokens():
    s, t, mask = tensors()
    pooled = mean_pool(torch.tensor(s), torch.tensor(mask)).numpy()
    assert np.allclose(pooled, np_pool(s, mask))
    ps, pt = np_pool(s, mask), np_pool(t, mask)
    expected = (ps * pt).sum(1) / np.linalg.norm(ps, axis=1) / np.linalg.norm(pt, axis=1)
    assert np.allclose(pooled_cosine(torch.tensor(s), torch.tensor(t), torch.tensor(mask)).numpy(), expected)
    s2 = s.copy()
    s2[1, 2:] = 1e6  # padded positions do not count
    assert np.allclose(pooled_cosine(torch.tensor(s2), torch.tensor(t), torch.tensor(mask)).numpy(), expected)


def test_token_mse_is_relative_to_the_teachers_energy():
    s, t, mask = tensors()
    keep = mask.astype(bool)
    expected = ((s - t)[keep] ** 2).mean() / (t[keep] ** 2).mean()
    assert float(token_mse(torch.tensor(s), torch.tensor(t), torch.tensor(mask))) == pytest.approx(expected)
    assert float(token_mse(torch.tensor(10 * s), torch.tensor(10 * t), torch.tensor(mask))) == pytest.approx(
        expected
    )


def test_kl_at_temperature():
    rng = np.random.default_rng(1)
    s, t, temp = rng.standard_normal((4, 6)), rng.standard_normal((4, 6)), 2.0

    def softmax(x):
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p, q = softmax(t / temp), softmax(s / temp)
    expected = temp**2 * (p * (np.log(p) - np.log(q))).sum(1).mean()
    assert float(kl_divergence(torch.tensor(s), torch.tensor(t), temp)) == pytest.approx(expected)


def test_default_loss_is_zero_for_the_teacher_itself_and_names_are_checked():
    _, t, mask = tensors()
    loss = distill_loss("cosine+mse")(torch.tensor(t), torch.tensor(t), torch.tensor(mask))
    assert float(loss) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(UserError, match="distill_loss 'l1': choose from cosine"):
        distill_loss("l1")
