"""Probabilities that mean what they say: expected calibration error and temperature scaling.

Temperature scaling (Guo et al., 2017) divides the logits by one scalar ``T`` fitted on the
validation set by minimising the negative log-likelihood; predictions (argmax) do not change,
only how confident they are. The ECE is torchmetrics' (15 equal-width confidence bins, L1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

ECE_BINS = 15
# A fitted T outside this range means the fit ran away (a separable validation set drives T to 0).
T_RANGE = (0.05, 20.0)
# The smallest validation set a temperature is estimated from: T is set by the misclassified and
# low-margin images (correct ones with a wide margin push it towards 0 without bound), so it needs
# errors to land on; with fewer than ~10 errors among ~100 images one image more or less moves the
# fitted T by tens of percent, and a sharpening T (< 1) fitted on a handful of errors is what made
# a 16-image toy run's test ECE much worse (issue 17).
MIN_VAL_IMAGES = 100
MIN_VAL_ERRORS = 10


def to_probabilities(logits: torch.Tensor, binary: bool) -> torch.Tensor:
    """Class probabilities ``(B, C)``: a binary model has one logit (sigmoid), others softmax."""
    if binary:
        p = torch.sigmoid(logits.float().reshape(-1))
        return torch.stack([1 - p, p], dim=1)
    return logits.float().softmax(dim=1)


def _nll(scaled: torch.Tensor, targets: torch.Tensor, binary: bool) -> torch.Tensor:
    if binary:
        return F.binary_cross_entropy_with_logits(scaled.reshape(-1), targets.float())
    return F.cross_entropy(scaled, targets)


def nll(logits: torch.Tensor, targets: torch.Tensor, binary: bool, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood at ``temperature`` (the evaluation loss the model reports)."""
    return float(_nll(logits.float() / temperature, targets, binary))


def ece(logits: torch.Tensor, targets: torch.Tensor, binary: bool, temperature: float = 1.0) -> float:
    probs = to_probabilities(logits.float() / temperature, binary)
    if binary:
        return float(binary_calibration_error(probs[:, 1].contiguous(), targets, n_bins=ECE_BINS))
    return float(multiclass_calibration_error(probs, targets, probs.shape[1], n_bins=ECE_BINS))


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, binary: bool) -> float:
    """The ``T`` minimising the NLL of ``logits / T`` (L-BFGS over ``log T``, so T stays positive)."""
    # clones: tensors collected under inference mode cannot take part in autograd
    logits, targets = logits.detach().float().cpu().clone(), targets.detach().cpu().clone()
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = _nll(logits / log_t.exp(), targets, binary)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(log_t.detach().exp())


def judge_temperature(logits: torch.Tensor, targets: torch.Tensor, binary: bool, t: float) -> str | None:
    """Why a temperature fitted on these validation logits must not be kept, or None to keep it.

    Kept only when the fit is finite and inside ``T_RANGE``, the split can support it
    (``MIN_VAL_IMAGES`` images, ``MIN_VAL_ERRORS`` errors), and it lowers the validation NLL without
    raising the validation ECE: a guard on the NLL alone lets through a T that the fit lowered the NLL
    with while tripling the ECE."""
    if not math.isfinite(t):
        return "the fit failed (T is not a finite number)"
    if not T_RANGE[0] < t < T_RANGE[1]:
        return f"the fit ran to T={t:.3g}, outside {T_RANGE[0]}..{T_RANGE[1]} (a separable validation set)"
    predicted = (logits.reshape(-1) > 0).long() if binary else logits.argmax(1)
    n, errors = len(targets), int((predicted != targets).sum())
    if n < MIN_VAL_IMAGES or errors < MIN_VAL_ERRORS:
        return (
            f"validation has {n} images and {errors} errors; a temperature needs at least {MIN_VAL_IMAGES} "
            f"and {MIN_VAL_ERRORS} to be estimated"
        )
    if nll(logits, targets, binary, t) >= nll(logits, targets, binary):
        return "T does not lower the validation NLL"
    before, after = ece(logits, targets, binary), ece(logits, targets, binary, t)
    if after > before:
        return f"T raises the validation ECE ({before:.4f} -> {after:.4f})"
    return None
