"""How close a student stays to its teacher without labels: the distillation losses and the held-out
fidelity measures of post-training LayerCollapse.

For an encoder's hidden states `[B, T, D]` (with the attention mask `[B, T]`):

- *mean-pooled cosine*: the cosine between the mask-weighted token means of student and teacher (the
  sentence embedding of sentence-transformers models), per example; the fidelity measure.
- the default loss `cosine+mse`: `(1 − mean-pooled cosine) + MSE of the masked tokens / mean teacher
  token energy` — the pooled term keeps the embedding's direction, the token term keeps every position
  (which the next layers and other poolings read); the MSE is scaled by the teacher's energy so that
  both terms are O(1) whatever the model's activation scale. `cosine` alone is the first term.

For a classifier's logits `[B, C]`: the loss `kl` is `T² · KL(softmax(t/T) ‖ softmax(s/T))`
(Hinton et al.); the fidelity measures are top-1 agreement with the teacher and the mean KL at T = 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lc_onnx.errors import UserError

LOSSES = ("cosine+mse", "cosine", "mse", "kl")


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`[B, T, D]` -> `[B, D]`: the mean over the tokens the mask keeps (all tokens without a mask)."""
    if mask is None:
        return hidden.mean(dim=1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def pooled_cosine(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-example cosine of the mean-pooled hidden states, `[B]`."""
    return F.cosine_similarity(mean_pool(student, mask), mean_pool(teacher, mask), dim=-1)


def token_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """MSE over the kept tokens, relative to the teacher's mean squared activation there."""
    keep = (
        torch.ones(student.shape[:2], dtype=torch.bool, device=student.device)
        if mask is None
        else mask.bool()
    )
    diff = (student - teacher)[keep]
    return diff.pow(2).mean() / teacher[keep].pow(2).mean().clamp(min=1e-12)


def kl_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`T² · KL(softmax(teacher/T) ‖ softmax(student/T))`, mean over the batch."""
    t = temperature
    return (
        t
        * t
        * F.kl_div(
            F.log_softmax(student / t, -1),
            F.log_softmax(teacher / t, -1),
            log_target=True,
            reduction="batchmean",
        )
    )


def distill_loss(name: str, temperature: float = 1.0) -> Callable[..., torch.Tensor]:
    """`loss(student, teacher, mask)` for one of `LOSSES` (`kl` compares logits, the others hidden states)."""
    if name == "kl":
        return lambda s, t, mask=None: kl_divergence(s, t, temperature)
    if name == "cosine":
        return lambda s, t, mask=None: (1.0 - pooled_cosine(s, t, mask)).mean()
    if name == "mse":
        return lambda s, t, mask=None: token_mse(s, t, mask)
    if name == "cosine+mse":
        return lambda s, t, mask=None: (1.0 - pooled_cosine(s, t, mask)).mean() + token_mse(s, t, mask)
    raise UserError(f"{{distill_loss}} {name!r}: choose from {', '.join(LOSSES)}", params=["distill_loss"])
