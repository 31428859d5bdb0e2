"""Slow, obviously-correct implementations of every method, written from the equations.

Loops over entries and neurons in float64; no vectorisation tricks. The fast code in `merging/`
is checked against these.
"""

from __future__ import annotations

import numpy as np
import torch


def keep_topk(values: np.ndarray, density: float) -> np.ndarray:
    """Keeps the k = max(1, int(density*n)) entries of largest |value| (ties: lowest index first).

    Used on data without ties at the threshold; where there are ties, which entries mergekit
    keeps is torch.argsort's business, and the tests compare against that directly.
    """
    flat = values.reshape(-1)
    n = flat.size
    if density >= 1:
        return values.copy()
    k = max(1, int(density * n))
    order = sorted(range(n), key=lambda i: (-abs(flat[i]), i))
    out = np.zeros_like(flat)
    for i in order[:k]:
        out[i] = flat[i]
    return out.reshape(values.shape)


def keep_threshold(values: np.ndarray, threshold: float) -> np.ndarray:
    return np.where(np.abs(values).astype(np.float32) >= np.float32(threshold), values, 0.0)


def kth_largest_abs(arrays: list[np.ndarray], density: float) -> float:
    """Returns the k-th largest |x| of the concatenation of `arrays` (float32), k = max(1, int(density*n))."""
    allv = np.sort(np.abs(np.concatenate([a.reshape(-1) for a in arrays]).astype(np.float32)))[::-1]
    k = max(1, int(density * allv.size))
    return float(allv[k - 1])


def task_arithmetic(base, fts, weights, lam, normalize):
    taus = [ft - base for ft in fts]
    total = sum(w * t for w, t in zip(weights, taus))
    if normalize and abs(sum(weights)) >= 1e-8:
        total = total / sum(weights)
    return base + lam * total


def ties_entrywise(taus: list[np.ndarray], weights, normalize: bool) -> np.ndarray:
    """mergekit's disjoint merge: sign = +1 where sum w_t tau_t >= 0; count entries with sign(w_t tau_t) == sign."""
    shape = taus[0].shape
    out = np.zeros(shape)
    for idx in np.ndindex(shape):
        vals = [w * t[idx] for w, t in zip(weights, taus)]
        sign = 1.0 if sum(vals) >= 0 else -1.0
        num = 0.0
        den = 0.0
        for w, v in zip(weights, vals):
            if np.sign(v) == sign:
                num += v
                den += w
        if normalize:
            out[idx] = num / (den if den != 0 else 1.0)
        else:
            out[idx] = num
    return out


def ties(base, fts, weights, densities, lam, normalize, thresholds=None):
    taus = []
    for i, ft in enumerate(fts):
        tau = ft - base
        tau = keep_threshold(tau, thresholds[i]) if thresholds is not None else keep_topk(tau, densities[i])
        taus.append(tau)
    return base + lam * ties_entrywise(taus, weights, normalize)


def _ties_mean(values: list[float], tie_sign: float) -> float:
    total = sum(values)
    sign = np.sign(total) if total != 0 else tie_sign
    agree = [v for v in values if np.sign(v) == sign]
    return sum(agree) / len(agree) if agree else 0.0


def neuromerging_rows(
    base: np.ndarray,
    taus: list[np.ndarray],
    lam_par: float,
    lam_orth: float,
    energy_threshold: float = 1.0,
    eps: float = float(np.finfo(np.float32).eps),
) -> np.ndarray:
    """NeuroMerging of one (rows, d) weight, one neuron at a time, with a full SVD per neuron.

    Coordinates are C = O V, as in the authors' kernel, so a zero orthogonal row gives exact
    zeros. Rounding noise (c = max(T, d) * eps) never votes: a scalar with
    |<tau, w0>| <= c ||tau|| ||w0||, an orthogonal row with ||O_t||^2 <= c ||tau_t||^2, a direction
    with s_j^2 <= c max(s_max^2, max_t ||tau_t||^2) and a coordinate with |C_tj| <= c s_j.
    """
    rows, d = base.shape
    T = len(taus)
    c = max(T, d) * eps
    scalars = np.zeros((T, rows))
    for k in range(rows):
        w0 = base[k]
        n2 = float(w0 @ w0)
        for t in range(T):
            dot = float(taus[t][k] @ w0)
            if n2 > 1e-30 and abs(dot) > c * np.linalg.norm(taus[t][k]) * np.sqrt(n2):
                scalars[t, k] = dot / n2
    tie = 1.0 if scalars.sum() >= 0 else -1.0
    out = np.zeros((rows, d))
    for k in range(rows):
        w0 = base[k]
        n2 = float(w0 @ w0)
        s_bar = _ties_mean(list(scalars[:, k]), tie)
        orth = np.zeros((T, d))
        for t in range(T):
            tau = taus[t][k]
            s_t = float(tau @ w0) / n2 if n2 > 1e-30 else 0.0
            o = tau - s_t * w0
            if float(o @ o) > c * float(tau @ tau):
                orth[t] = o
        _, sing, vh = np.linalg.svd(orth, full_matrices=False)
        coords = orth @ vh.T  # (T, r)
        tau_energy = max(float(taus[t][k] @ taus[t][k]) for t in range(T))
        noise = c * max(float(sing.max()) ** 2 if sing.size else 0.0, tau_energy)
        energy = sing**2
        total_energy = energy.sum()
        psi = np.zeros(d)
        before = 0.0
        for j in range(len(sing)):
            share_before = before / total_energy if total_energy > 0 else 0.0
            before += energy[j]
            if energy[j] <= noise or (energy_threshold < 1 and share_before >= energy_threshold):
                continue
            col = np.where(np.abs(coords[:, j]) > c * sing[j], coords[:, j], 0.0)
            tie_j = np.sign(col[np.argmax(np.abs(col))]) or 1.0
            psi += _ties_mean(list(col), tie_j) * vh[j]
        if n2 > 1e-30:
            psi -= (psi @ w0) / n2 * w0
        out[k] = lam_orth * psi + lam_par * s_bar * w0
    return out


def neuromerging_points(taus: list[np.ndarray], lam: float) -> np.ndarray:
    out = np.zeros(taus[0].shape)
    for idx in np.ndindex(out.shape):
        out[idx] = lam * _ties_mean([t[idx] for t in taus], 1.0)
    return out


def as_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()
