"""Decisions in money: the threshold that maximises the expected value of retention offers.

The cost model (documented in the README): every customer offered a retention incentive costs
`offer_cost`; a churner who gets the offer is kept and is worth `customer_value` (the value of a
customer kept: margin over the horizon the business cares about, times the chance that an offer
changes a leaver's mind); customers not offered cost and earn nothing (the baseline). Offering
to a set S is worth  sum over S of (customer_value * churned - offer_cost).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OFFER_COST = 100.0
CUSTOMER_VALUE = 500.0


@dataclass(frozen=True)
class CostModel:
    """The money behind a decision: cost of one offer, value of one churner kept."""

    offer_cost: float = OFFER_COST
    customer_value: float = CUSTOMER_VALUE

    def __post_init__(self) -> None:
        if not (self.offer_cost > 0 and self.customer_value > 0):
            raise ValueError("offer_cost and customer_value must be positive")

    @property
    def break_even(self) -> float:
        """The churn probability at which an offer pays for itself (for calibrated scores)."""
        return self.offer_cost / self.customer_value

    def expected_value(self, y_true: np.ndarray, offered: np.ndarray) -> float:
        """Value of offering to the customers where `offered` is true, against offering to nobody."""
        y = np.asarray(y_true, dtype=float)
        return float(np.sum(np.where(offered, self.customer_value * y - self.offer_cost, 0.0)))


def midpoint_below(chosen: float, proba: np.ndarray) -> float:
    """Midway between `chosen` and the next lower distinct probability (or 0): the same decisions
    on these rows, but no row sits exactly on the threshold, so a last-bit difference between
    backends cannot flip a decision."""
    lower = proba[proba < chosen]
    return (chosen + (float(lower.max()) if lower.size else 0.0)) / 2


def value_curve(y_true: np.ndarray, proba: np.ndarray, cost: CostModel) -> tuple[np.ndarray, np.ndarray]:
    """Expected value of offering to every customer with p >= t, for each distinct p (descending).

    Returns (distinct probabilities, descending; expected value when the offer goes to all
    customers scoring at least that much). Ties are offered together, as a threshold must.
    """
    y = np.asarray(y_true, dtype=float)
    p = np.asarray(proba, dtype=float)
    order = np.argsort(-p, kind="stable")
    gains = np.cumsum(cost.customer_value * y[order] - cost.offer_cost)
    p_sorted = p[order]
    # The last row of each group of equal probabilities closes that group.
    last = np.r_[p_sorted[1:] != p_sorted[:-1], True]
    return p_sorted[last], gains[last]


def choose_ev_threshold(y_true: np.ndarray, proba: np.ndarray, cost: CostModel) -> float:
    """Threshold that maximises the expected value on these (validation) rows.

    Ties between thresholds go to the highest one (the same money for fewer offers). When no
    set of customers is worth an offer, the threshold sits midway between the highest score and
    1, so nobody here is offered. Otherwise it is placed midway below the lowest score that is
    offered (see midpoint_below).
    """
    p = np.asarray(proba, dtype=float)
    levels, values = value_curve(y_true, p, cost)
    best = int(np.argmax(values))  # first maximum = highest threshold
    if values[best] <= 0:
        return (float(p.max()) + 1.0) / 2
    return midpoint_below(float(levels[best]), p)


def capture_rate(y_true: np.ndarray, proba: np.ndarray, share: float) -> float:
    """Share of all churners among the top `share` of customers by score (cumulative gains)."""
    y = np.asarray(y_true)
    k = round(share * len(y))
    top = np.argsort(-np.asarray(proba), kind="stable")[:k]
    return float(y[top].sum() / max(y.sum(), 1))


def decision_summary(y_true: np.ndarray, proba: np.ndarray, threshold: float, cost: CostModel) -> dict[str, float]:
    """Expected value (total and per customer), precision, recall and offer rate at a threshold."""
    y = np.asarray(y_true)
    offered = np.asarray(proba) >= threshold
    ev = cost.expected_value(y, offered)
    kept = int((offered & (y == 1)).sum())
    return {
        "threshold": float(threshold),
        "expected_value": ev,
        "expected_value_per_customer": ev / len(y),
        "offers": int(offered.sum()),
        "offer_rate": float(offered.mean()),
        "precision": kept / max(int(offered.sum()), 1),
        "recall": kept / max(int((y == 1).sum()), 1),
    }
