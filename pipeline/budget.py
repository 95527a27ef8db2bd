"""The forgetting budget (`train --max-forgetting EPS`): kd_lambda becomes a Lagrange multiplier that keeps the
student's KL to the base on the rehearsal tokens at or under EPS ([forgetting budget note]).

What is bounded, precisely: the running average over training steps of the mean per-token forward KL(teacher ||
student) over the k+1 buckets of the cached targets (at the cache's temperature, with LoRA dropout on), on the
rehearsal tokens of each step. `pipeline evaluate` reports another figure: the full-vocabulary KL at T = 1 on
held-out prompts, in eval mode.
"""

from __future__ import annotations

# [forgetting budget note] --max-forgetting EPS turns kd_lambda into a Lagrange multiplier of the constraint
# "KL(base || student) per rehearsal token <= EPS". After each step, with kl the step's forward KL on its
# rehearsal tokens (from the cached targets, so it costs no teacher pass):
#     kl_avg <- kl                                   at the first measured step
#     kl_avg <- BUDGET_EMA * kl_avg + (1 - BUDGET_EMA) * kl     after it
#     lambda <- max(0, lambda + BUDGET_STEP * (kl_avg - EPS) / EPS)
# The violation is relative to EPS, so one step size serves budgets of any scale (0.001 or 0.1 nats): while the
# running KL is twice the budget lambda rises by BUDGET_STEP per step, and under it falls by at most that, so
# the multiplier falls no faster than it rises and a budget is kept rather than bargained over. 0.2 moves
# lambda by a few units over the tens of steps of the demo, the range over which fixed lambdas change its
# forgetting (0 to 1 cut the held-out KL 3x), without swinging it step by step. The running average (about the
# last 5 steps) smooths the KL of the 2-3 rehearsal examples a step holds. A step without rehearsal tokens
# measures nothing and leaves both unchanged.
BUDGET_STEP = 0.2
BUDGET_EMA = 0.8


def dual_ascent(lam: float, kl_avg: float | None, kl: float | None, budget: float) -> tuple[float, float | None]:
    """One update of the forgetting budget's multiplier ([forgetting budget note]); returns (lambda, kl_avg)."""
    if kl is None:
        return lam, kl_avg
    kl_avg = kl if kl_avg is None else BUDGET_EMA * kl_avg + (1 - BUDGET_EMA) * kl
    return max(0.0, lam + BUDGET_STEP * (kl_avg - budget) / budget), kl_avg


def next_kd_lambda(kd_lambda: float, multiplier: float | None, budget: float | None) -> float:
    """The KL weight of the next step: `kd_lambda`, or under a budget the multiplier (which starts at kd_lambda)."""
    if budget is None or multiplier is None:
        return kd_lambda
    return multiplier
