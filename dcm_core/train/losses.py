"""DCM training losses (dcm-method.md §5.2 step 6, §6.2 steps 4–7).

All losses are computed in float32, whatever the autocast dtype of the forward passes, as
the official scripts do (``.float()`` casts). They are plain functions of tensors so they can
be checked against hand-computed values; the re-noising used by the adversarial branch lives
in :mod:`dcm_core.flow` (:func:`~dcm_core.flow.renoise`) and is wrapped in
:mod:`dcm_core.train.solver` next to the other grid arithmetic.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

#: Pseudo-Huber constant of the official consistency loss.
DEFAULT_HUBER_C = 0.001
#: Latent-frame stride of the Temporal Coherence loss.
DEFAULT_TC_STRIDE = 3


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float = DEFAULT_HUBER_C) -> torch.Tensor:
    """Consistency loss ``mean(sqrt((ŷ − y)² + c²) − c)`` over every element (dcm-method.md §5.2, §6.2 step 4).

    Args:
        pred: the student's boundary prediction ŷ.
        target: the consistency target y (no gradient expected).
        c: the Huber constant (official 0.001).
    """
    d = pred.float() - target.float()
    return torch.mean(torch.sqrt(d * d + c * c) - c)


def temporal_coherence(pred: torch.Tensor, target: torch.Tensor, stride: int = DEFAULT_TC_STRIDE) -> torch.Tensor:
    """Temporal Coherence loss of the semantic stage (dcm-method.md §5.2 step 6).

    ``MSE(ŷ[:, :, s:] − ŷ[:, :, :−s], y[:, :, s:] − y[:, :, :−s])`` on ``[B, C, T, H, W]``
    boundary predictions (x-space, latent time axis, stride ``s`` = 3). Returns 0 when
    ``T ≤ s``: the official guard is ``if T > 3`` for its stride of 3.
    """
    if pred.ndim != 5:
        raise ValueError(f"temporal_coherence expects [B, C, T, H, W] latents, got shape {tuple(pred.shape)}")
    t = pred.shape[2]
    if t <= stride:
        return pred.new_zeros((), dtype=torch.float32)
    p, y = pred.float(), target.float()
    return F.mse_loss(p[:, :, stride:] - p[:, :, :-stride], y[:, :, stride:] - y[:, :, :-stride])


def hinge_g_loss(fake_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Generator hinge term ``Σ_h mean(relu(1 − D_h(fake))) / N_heads`` (dcm-method.md §6.2 step 6).

    The official ×5 multiplier is applied by the caller (``loss.gan_g_weight``).
    """
    if not fake_logits:
        raise ValueError("hinge_g_loss needs at least one discriminator head output")
    return sum(torch.mean(F.relu(1.0 - f.float())) for f in fake_logits) / len(fake_logits)


def hinge_d_loss(fake_logits: Sequence[torch.Tensor], real_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Discriminator hinge loss ``Σ_h [mean(relu(1 + D_h(fake))) + mean(relu(1 − D_h(real)))] / N_heads``.

    dcm-method.md §6.2 step 7; not scaled by the adversarial weight.
    """
    if len(fake_logits) != len(real_logits) or not fake_logits:
        raise ValueError(
            f"hinge_d_loss needs as many real as fake head outputs (got {len(real_logits)} real, {len(fake_logits)} fake)"
        )
    total = sum(
        torch.mean(F.relu(1.0 + f.float())) + torch.mean(F.relu(1.0 - r.float()))
        for f, r in zip(fake_logits, real_logits)
    )
    return total / len(fake_logits)


def feature_matching(fake_features: Sequence[torch.Tensor], real_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Feature-matching loss: MSE between teacher-head-decoded features of fake and real.

    The official code stacks the per-layer decoded latents ``[N_heads, B, C, T, H, W]`` and takes
    one ``mse_loss`` over the stack, i.e. the mean over every element of every layer
    (dcm-method.md §6.2 step 6). The weight (Wan ×10, HunyuanVideo ×1) is applied by the caller.
    """
    if len(fake_features) != len(real_features) or not fake_features:
        raise ValueError("feature_matching needs the same (non-zero) number of fake and real feature maps")
    fake = torch.stack([f.float() for f in fake_features])
    real = torch.stack([r.float() for r in real_features])
    return F.mse_loss(fake, real)
