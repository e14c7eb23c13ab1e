"""The int8 parity gate's statistics: reject on evidence, not on noise.

int8 and fp32 are run on the same samples, so they are compared as a pair:

- **Accuracy** (held-out slice). Only the discordant pairs say anything about a difference:
  `fp32_only` samples fp32 gets right and int8 wrong, `int8_only` the reverse. McNemar's exact
  test asks how likely `fp32_only` or more of the `fp32_only + int8_only` discordant samples
  would fall on fp32's side if both models were equally good (a fair coin per discordant
  sample). The gate rejects only when that one-sided p-value is below `alpha` **and** the
  observed drop exceeds the configured limit.
- **Top-1 agreement** (held-out slice plus a few replay-buffer samples). A faithful int8 model
  still disagrees with fp32 on near-ties, so the null hypothesis is "disagreement rate is at
  most the allowed 1 - min_agreement". The gate rejects only when an exact binomial test puts
  the observed disagreements above that rate with p below `alpha`, which is the same as the
  one-sided (1 - alpha) Clopper-Pearson lower bound of the disagreement rate exceeding the
  allowed rate; the observed rate then necessarily exceeds the limit too.

Everything here is exact arithmetic over the binomial distribution (no scipy), so the power
the docs quote (`power_accuracy`, `power_agreement`) is computed, not simulated.
"""
from __future__ import annotations

import math
from functools import lru_cache

DEFAULT_ALPHA = 0.05


@lru_cache(maxsize=4096)
def binom_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    total = 0.0
    for i in range(k, n + 1):
        total += math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                          + i * lp + (n - i) * lq)
    return min(1.0, total)


def mcnemar_p(fp32_only: int, int8_only: int) -> float:
    """One-sided exact McNemar p-value for "int8 is less accurate than fp32"."""
    return binom_sf(int(fp32_only), int(fp32_only) + int(int8_only), 0.5)


def judge_accuracy(fp32_correct, int8_correct, max_drop: float,
                   alpha: float = DEFAULT_ALPHA) -> dict:
    """The accuracy check on paired per-sample outcomes (sequences of bools, same samples).

    Returns the figures plus `verdict` ("pass" or "reject") and a one-line `reason`."""
    pairs = list(zip((bool(v) for v in fp32_correct), (bool(v) for v in int8_correct)))
    n = len(pairs)
    fp32_only = sum(1 for f, q in pairs if f and not q)
    int8_only = sum(1 for f, q in pairs if q and not f)
    acc_f = sum(1 for f, _ in pairs if f) / n if n else None
    acc_q = sum(1 for _, q in pairs if q) / n if n else None
    drop = (fp32_only - int8_only) / n if n else 0.0
    p = mcnemar_p(fp32_only, int8_only)
    figures = {"n": n, "accuracy_fp32": acc_f, "accuracy_int8": acc_q, "drop": drop,
               "fp32_only": fp32_only, "int8_only": int8_only, "p_value": p, "alpha": alpha,
               "limit": max_drop, "min_detectable_drop": min_detectable_drop(n, max_drop, alpha)}
    significant, over = p < alpha, drop > max_drop + 1e-12
    head = (f"int8 held-out accuracy {_pct(acc_q)} vs fp32 {_pct(acc_f)} on {n} samples: "
            f"drop {drop * 100:.1f} points (limit {max_drop * 100:g}); "
            f"fp32-only right {fp32_only}, int8-only right {int8_only}, "
            f"McNemar p = {p:.3g}")
    if significant and over:
        figures.update(verdict="reject", reason=f"{head} < {alpha:g}: int8 is worse")
    elif over:
        figures.update(verdict="pass", reason=f"{head} >= {alpha:g}: within what {n} samples "
                                              "can explain")
    else:
        figures.update(verdict="pass", reason=f"{head}: within the limit")
    return figures


def judge_agreement(disagree: int, n: int, min_agreement: float,
                    alpha: float = DEFAULT_ALPHA) -> dict:
    """The top-1 agreement check: `disagree` of `n` samples have a different int8 top-1."""
    allowed = max(0.0, 1.0 - min_agreement)
    agreement = 1.0 - disagree / n if n else 1.0
    p = binom_sf(int(disagree), int(n), allowed) if n else 1.0
    lower = disagreement_lower_bound(disagree, n, alpha)
    figures = {"n": n, "disagree": int(disagree), "agreement": agreement,
               "min_agreement": min_agreement, "p_value": p, "alpha": alpha,
               "disagreement_lower_bound": lower}
    head = (f"int8 vs fp32 top-1 agreement {agreement:.1%} on {n} samples ({disagree} differ; "
            f"allowed {allowed:.0%} = agreement {min_agreement:.0%}): p = {p:.3g}")
    if n and p < alpha:
        figures.update(verdict="reject",
                       reason=f"{head} < {alpha:g}: the disagreement rate is at least "
                              f"{lower:.1%} (one-sided {1 - alpha:.4g} bound)")
    elif disagree / max(n, 1) > allowed:
        figures.update(verdict="pass", reason=f"{head} >= {alpha:g}: within what {n} samples "
                                              "can explain")
    else:
        figures.update(verdict="pass", reason=f"{head}: within the limit")
    return figures


def disagreement_lower_bound(disagree: int, n: int, alpha: float = DEFAULT_ALPHA) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound of a rate seen `disagree` times in n
    (bisection on binom_sf, which rises with the rate)."""
    if disagree <= 0 or n <= 0:
        return 0.0
    lo, hi = 0.0, disagree / n
    for _ in range(50):
        mid = (lo + hi) / 2
        if _sf_uncached(disagree, n, mid) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


def min_detectable_drop(n: int, max_drop: float, alpha: float = DEFAULT_ALPHA) -> float | None:
    """The smallest observed drop the gate can reject at n samples (every discordant sample
    on fp32's side): max(k / n, the limit) with k the fewest losses McNemar finds significant.
    None when n is too small for any drop to be significant."""
    for k in range(1, n + 1):
        if mcnemar_p(k, 0) < alpha and k / n > max_drop + 1e-12:
            return k / n
    return None


def power_accuracy(n: int, loss: float, gain: float, max_drop: float,
                   alpha: float = DEFAULT_ALPHA) -> float:
    """Probability that the accuracy check rejects at n held-out samples, when each sample is
    independently fp32-only right with probability `loss` and int8-only right with `gain`
    (true drop = loss - gain)."""
    rest = 1.0 - loss - gain
    if rest < 0:
        raise ValueError("loss + gain must be at most 1")
    total = 0.0
    for d in range(n + 1):  # d discordant samples, b of them on fp32's side
        p_d = _binom_pmf(d, n, loss + gain)
        if p_d < 1e-15:
            continue
        share = loss / (loss + gain) if loss + gain else 0.0
        for b in range(d + 1):
            if mcnemar_p(b, d - b) < alpha and (2 * b - d) / n > max_drop + 1e-12:
                total += p_d * _binom_pmf(b, d, share)
    return min(1.0, total)


def power_agreement(n: int, rate: float, min_agreement: float,
                    alpha: float = DEFAULT_ALPHA) -> float:
    """Probability that the agreement check rejects at n samples if int8's top-1 differs
    from fp32's with probability `rate` per sample."""
    allowed = max(0.0, 1.0 - min_agreement)
    k = next((k for k in range(n + 1) if binom_sf(k, n, allowed) < alpha), None)
    return 0.0 if k is None else _sf_uncached(k, n, rate)


def _binom_pmf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 1.0 if k == 0 else 0.0
    if p >= 1.0:
        return 1.0 if k == n else 0.0
    return math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                    + k * math.log(p) + (n - k) * math.log1p(-p))


def _sf_uncached(k: int, n: int, p: float) -> float:
    return binom_sf.__wrapped__(k, n, p)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"
