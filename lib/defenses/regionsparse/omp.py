"""Orthogonal matching pursuit batched over all patches in torch (checked against scikit-learn's orthogonal_mp)."""
from __future__ import annotations

import torch

from lib.validate import check_positive_int


def batch_omp(signals: torch.Tensor, dictionary: torch.Tensor, sparsity: int, chunk: int = 200_000) -> torch.Tensor:
    """Orthogonal matching pursuit for many signals at once: codes (n, k) with at most `sparsity` non-zeros.

    signals (n, d), dictionary (k, d) with unit-norm rows. OMP vectorised over signals: each step picks the atom of
    largest |residual correlation| (not yet chosen), refits all chosen coefficients by least squares on the Gram
    matrix (batched solve) and correlates the new residual with the dictionary (one product, cheaper than gathering
    Gram rows when d < k). A signal whose residual correlation vanishes stops early, like scikit-learn.
    """
    support, valid, coef = _omp(signals, dictionary, sparsity, chunk)
    return signals.new_zeros(len(signals), dictionary.shape[0]).scatter_add_(1, support, coef)


def support_projection(signals: torch.Tensor, dictionary: torch.Tensor, sparsity: int,
                       chunk: int = 200_000) -> torch.Tensor:
    """The reconstructions (n, d) `batch_omp(signals, ...) @ dictionary`, differentiable in `signals`: OMP chooses each
    signal's atoms without gradients, then the signal is projected onto their span by a differentiable least-squares
    solve. Its value is OMP's reconstruction; its gradient is exact wherever the chosen atoms do not change."""
    with torch.no_grad():
        support, valid, _ = _omp(signals.detach(), dictionary, sparsity, chunk)
    atoms = dictionary.to(signals)[support]                                  # (n, K, d)
    both = valid[:, :, None] & valid[:, None, :]
    eye = torch.eye(support.shape[1], device=signals.device, dtype=signals.dtype).expand(len(signals), -1, -1)
    gram = torch.where(both, atoms @ atoms.transpose(1, 2), eye)
    rhs = torch.where(valid, torch.einsum("nd,nkd->nk", signals, atoms), torch.zeros_like(valid, dtype=signals.dtype))
    coef = torch.linalg.solve(gram, rhs)
    return torch.einsum("nk,nkd->nd", coef, atoms)


def _omp(signals: torch.Tensor, dictionary: torch.Tensor, sparsity: int, chunk: int
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(support (n, K) atom indices, valid (n, K) slots in use, coef (n, K), zero on unused slots) of OMP."""
    if signals.dim() != 2 or dictionary.dim() != 2 or signals.shape[1] != dictionary.shape[1]:
        raise ValueError(f"need signals (n, d) and dictionary (k, d); got {tuple(signals.shape)} and "
                         f"{tuple(dictionary.shape)}")
    check_positive_int(sparsity, "sparsity")
    if sparsity > dictionary.shape[0]:
        raise ValueError(f"sparsity {sparsity} exceeds the number of atoms {dictionary.shape[0]}")
    dictionary = dictionary.to(device=signals.device, dtype=signals.dtype)
    if not len(signals):
        empty = torch.zeros(0, sparsity, dtype=torch.long, device=signals.device)
        return empty, empty.bool(), signals.new_zeros(0, sparsity)
    gram = dictionary @ dictionary.T
    parts = [_omp_chunk(s, dictionary, gram, sparsity) for s in signals.split(chunk)]
    return tuple(torch.cat(p) for p in zip(*parts))


def _omp_chunk(x: torch.Tensor, dictionary: torch.Tensor, gram: torch.Tensor, sparsity: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, k = x.shape[0], dictionary.shape[0]
    rows = torch.arange(n, device=x.device)
    corr0 = x @ dictionary.T                       # (n, k) correlations with the signal
    corr = corr0
    chosen = torch.zeros(n, k, dtype=torch.bool, device=x.device)
    support = torch.zeros(n, sparsity, dtype=torch.long, device=x.device)
    valid = torch.zeros(n, sparsity, dtype=torch.bool, device=x.device)
    alive = torch.ones(n, dtype=torch.bool, device=x.device)
    tiny = torch.finfo(x.dtype).eps * 10 * corr0.abs().amax(1).clamp_min(1.0)
    coef = x.new_zeros(n, 0)
    for t in range(sparsity):
        score = corr.abs().masked_fill(chosen, -1.0)
        best, j = score.max(1)
        alive &= best > tiny
        support[:, t] = j
        valid[:, t] = alive
        chosen[rows[alive], j[alive]] = True
        s = support[:, :t + 1]
        v = valid[:, :t + 1]
        g = gram[s[:, :, None], s[:, None, :]]    # (n, t+1, t+1)
        both = v[:, :, None] & v[:, None, :]
        eye = torch.eye(t + 1, device=x.device, dtype=x.dtype).expand_as(g)
        g = torch.where(both, g, eye)
        rhs = torch.where(v, corr0.gather(1, s), torch.zeros_like(corr0[:, :t + 1]))
        coef = torch.linalg.solve(g, rhs)          # zero on invalid slots
        residual = x - torch.bmm(coef[:, None, :], dictionary[s]).squeeze(1)   # (n, d): smaller than gram[s]
        corr = residual @ dictionary.T
    return support, valid, coef * valid
