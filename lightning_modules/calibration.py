"""Probabilities that mean what they say: expected calibration error and temperature scaling.

Temperature scaling (Guo et al., 2017) divides the logits by one scalar ``T`` fitted on the
validation set by minimising the negative log-likelihood; predictions (argmax) do not change,
only how confident they are. The ECE is torchmetrics' (15 equal-width confidence bins, L1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

ECE_BINS = 15
# T outside this range means the validation set is degenerate (e.g. all correct with margin):
# the fit is clamped rather than trusted to produce infinite or vanishing logits.
T_RANGE = (0.05, 20.0)


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
    low, high = T_RANGE
    return float(min(high, max(low, float(log_t.detach().exp()))))
