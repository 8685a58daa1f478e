"""Blend weights fit on out-of-fold predictions, and how well the blend does on rows it was not fit on.

Weights are non-negative and sum to 1. ``convex`` solves that constrained least-squares problem for the best
convex combination of the models (SLSQP, an iterative solver; ``nnls``, its old name, is accepted) and checks the
answer: the duality gap of the weights (how far their mean squared error can be above the best combination's, a
bound that holds for any weights on the simplex) must be below ``GAP_TOLERANCE`` of the best single model's, else
a warning names it and the solver's message;
``hill`` is Caruana's hill climbing with replacement from the best single model, adding a model only while the
OOF RMSE improves by at least ``min_improvement``: with 20+ correlated models it keeps few of them and overfits
the OOF less. Either way the blend's in-sample OOF RMSE is never worse than the best single model's.

The in-sample RMSE flatters the blend (the weights saw those rows), so ``cross_validated`` refits the weights on
the other folds' OOF rows and scores each held-out fold: the number to compare models by.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from .metrics import rmse

log = logging.getLogger("pawpular")
GAP_TOLERANCE = 1e-6  # the convex blend's duality gap allowed, relative to the best single model's mean squared error


@dataclass
class Blend:
    names: list[str]
    weights: np.ndarray
    steps: list[tuple[str, float]]  # (what was added, OOF RMSE after it)


def _hill(oof: np.ndarray, y: np.ndarray, names: list[str], best: int, current: float, min_improvement: float) -> Blend:
    n_models = oof.shape[1]
    counts = np.zeros(n_models)
    counts[best] = 1
    steps = [(names[best], current)]
    while True:
        trials = [rmse(oof @ ((counts + np.eye(n_models)[j]) / (counts.sum() + 1)), y) for j in range(n_models)]
        j = int(np.argmin(trials))
        if current - trials[j] < min_improvement:
            break
        counts[j] += 1
        current = trials[j]
        steps.append((names[j], current))
    return Blend(names, counts / counts.sum(), steps)


def canonical(method: str) -> str:
    """The method's name as weights.json and the log write it: the old name ``nnls`` is ``convex``."""
    return "convex" if method == "nnls" else method


def fit_weights(
    oof: np.ndarray, y: np.ndarray, names: list[str], method: str = "convex", min_improvement: float = 1e-4
) -> Blend:
    """Non-negative weights summing to 1 minimizing the RMSE of ``oof @ w`` against ``y`` (oof: [n, models])."""
    n_models = oof.shape[1]
    singles = [rmse(oof[:, j], y) for j in range(n_models)]
    best = int(np.argmin(singles))
    if method == "hill":
        return _hill(oof, y, names, best, singles[best], min_improvement)
    if canonical(method) != "convex":
        raise ValueError(f"ensemble.method must be convex (or its old name nnls) or hill, got {method!r}")
    gram, rhs = oof.T @ oof / len(y), oof.T @ y / len(y)
    res = minimize(
        lambda w: w @ gram @ w - 2 * rhs @ w,
        np.full(n_models, 1 / n_models),
        jac=lambda w: 2 * (gram @ w - rhs),
        bounds=[(0, 1)] * n_models,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
        method="SLSQP",
        options={"ftol": 1e-12, "maxiter": 1000},
    )
    w = np.clip(res.x, 0, None)
    w = w / w.sum() if w.sum() > 0 else np.eye(n_models)[best]
    if rmse(oof @ w, y) > singles[best]:  # never worse than the best single model (guards solver tolerance)
        w = np.eye(n_models)[best]
    grad = 2 * (gram @ w - rhs)  # the objective's gradient; convexity: MSE(w) - best MSE <= grad @ w - min(grad)
    gap = float(grad @ w - grad.min())
    if not res.success or gap > GAP_TOLERANCE * singles[best] ** 2:
        log.warning(
            "ensemble: the convex blend's solver did not reach the optimum (%s; duality gap %.3g in mean "
            "squared error, allowed %.3g): its weights may be off the best",
            res.message,
            gap,
            GAP_TOLERANCE * singles[best] ** 2,
        )
    return Blend(names, w, [(names[best], singles[best]), ("convex", rmse(oof @ w, y))])


def cross_validated(
    oof: np.ndarray,
    y: np.ndarray,
    fold: np.ndarray,
    names: list[str],
    method: str = "convex",
    min_improvement: float = 1e-4,
) -> tuple[float, np.ndarray]:
    """(RMSE, predictions) of the blend recipe scored on rows its weights never saw: for every fold, weights
    fit on the other folds' OOF rows predict that fold's rows (clipped to [1, 100] as the submission is)."""
    pred = np.empty(len(y))
    for k in np.unique(fold):
        held = fold == k
        w = fit_weights(oof[~held], y[~held], names, method, min_improvement).weights
        pred[held] = np.clip(oof[held] @ w, 1, 100)
    return rmse(pred, y), pred
