"""The int8 parity gate judges on evidence: exact McNemar / binomial arithmetic, power, and
real exports (a faithful int8 model passes on small and large held-out slices, a wrongly
scaled one is rejected with the reason shown)."""
from __future__ import annotations

import pytest

from edgecl.export.gate import (binom_sf, disagreement_lower_bound, judge_accuracy,
                                judge_agreement, mcnemar_p, min_detectable_drop,
                                power_accuracy, power_agreement)
from edgecl.export.onnx import check_parity, export_student, label_indices, to_model_input
from export_helpers import (CLASSES, NAMES, SHAPE, blob_images, fitted_student,  # noqa: F401
                            misscale_int8, one_torch_thread)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def paired(n: int, fp32_only: int, int8_only: int, both_wrong: int = 0):
    """Per-sample (fp32 correct, int8 correct) with the given discordant counts."""
    f = [True] * fp32_only + [False] * int8_only + [False] * both_wrong
    q = [False] * fp32_only + [True] * int8_only + [False] * both_wrong
    rest = n - len(f)
    return f + [True] * rest, q + [True] * rest


def test_exact_binomial_and_mcnemar_by_hand():
    assert binom_sf(0, 5, 0.3) == 1.0 and binom_sf(6, 5, 0.3) == 0.0
    assert binom_sf(5, 5, 0.5) == pytest.approx(1 / 32)
    assert binom_sf(2, 3, 0.5) == pytest.approx(4 / 8)
    assert mcnemar_p(5, 0) == pytest.approx(1 / 32)
    assert mcnemar_p(1, 0) == pytest.approx(0.5)
    assert mcnemar_p(0, 3) == 1.0
    # 8 vs 2 discordant: P(X >= 8 | 10, 1/2) = (45 + 10 + 1) / 1024
    assert mcnemar_p(8, 2) == pytest.approx(56 / 1024)


def test_the_issues_coin_toss_now_passes_and_says_why():
    """44 held-out samples, int8 one sample worse (2.3 points > the 1-point limit): noise."""
    f, q = paired(44, fp32_only=1, int8_only=0, both_wrong=3)
    out = judge_accuracy(f, q, max_drop=0.01)
    assert out["verdict"] == "pass"
    assert out["drop"] == pytest.approx(1 / 44) and out["p_value"] == pytest.approx(0.5)
    assert "within what 44 samples can explain" in out["reason"]
    assert "McNemar p = 0.5" in out["reason"]


def test_a_significant_drop_over_the_limit_is_rejected():
    f, q = paired(200, fp32_only=9, int8_only=1)
    out = judge_accuracy(f, q, max_drop=0.01)
    assert out["verdict"] == "reject" and out["p_value"] < 0.05
    assert "int8 is worse" in out["reason"] and "drop 4.0 points" in out["reason"]


def test_a_significant_drop_within_the_limit_passes():
    """Many samples make a small drop significant; the limit still decides it is acceptable."""
    f, q = paired(2000, fp32_only=12, int8_only=0)
    out = judge_accuracy(f, q, max_drop=0.01)
    assert out["p_value"] < 0.001 and out["verdict"] == "pass"
    assert "within the limit" in out["reason"]


def test_agreement_rejects_only_above_the_allowed_rate_with_evidence():
    assert judge_agreement(3, 44, 0.98)["verdict"] == "pass"     # 6.8 % seen, p = 0.06
    assert judge_agreement(3, 44, 0.98)["p_value"] > 0.05
    assert judge_agreement(4, 232, 0.98)["verdict"] == "pass"    # 1.7 %: under the limit
    bad = judge_agreement(20, 232, 0.98)
    assert bad["verdict"] == "reject" and bad["disagreement_lower_bound"] > 0.02
    assert "agreement 91.4%" in bad["reason"]
    # the bound is the Clopper-Pearson one: the rate at which 20 or more of 232 has p = alpha
    lb = disagreement_lower_bound(20, 232, 0.05)
    assert binom_sf(20, 232, lb) == pytest.approx(0.05, abs=1e-6)


def test_power_is_what_the_docs_quote():
    # A one-way loss needs 5 discordant samples at alpha 0.05 (1/32 < 0.05 < 1/16).
    assert min_detectable_drop(44, 0.01) == pytest.approx(5 / 44)
    assert min_detectable_drop(200, 0.01) == pytest.approx(5 / 200)
    assert min_detectable_drop(4, 0.01) is None
    # No difference: rejection is rare (below alpha); a 5-point drop at 200 is nearly certain.
    assert power_accuracy(200, 0.01, 0.01, 0.01) < 0.05
    assert power_accuracy(200, 0.05, 0.0, 0.01) > 0.95
    assert power_accuracy(40, 0.05, 0.0, 0.01) < power_accuracy(200, 0.05, 0.0, 0.01)
    # agreement: a faithful 1 % rate is almost never rejected, 10 % on 232 always
    assert power_agreement(232, 0.01, 0.98) < 0.01
    assert power_agreement(232, 0.10, 0.98) > 0.99


@pytest.fixture(scope="module")
def student():
    x, y = blob_images(24, seed=0)
    return fitted_student(x, y, NAMES), x


@pytest.mark.parametrize("per_class", [3, 60])  # 12 and 240 held-out samples
def test_faithful_int8_passes_on_small_and_large_slices(student, per_class):
    model, x = student
    hx, hy = blob_images(per_class, seed=1)
    result = export_student(model, NAMES, SHAPE, x, hx, hy)
    assert result.passed, result.parity.failures
    checks = result.parity.checks
    assert checks["accuracy"]["n"] == per_class * CLASSES
    assert checks["accuracy"]["verdict"] == checks["agreement"]["verdict"] == "pass"
    assert "McNemar p" in checks["accuracy"]["reason"]


@pytest.mark.parametrize("per_class", [3, 60])
def test_wrongly_scaled_int8_is_rejected_with_the_reason(student, per_class):
    model, x = student
    hx, hy = blob_images(per_class, seed=1)
    good = export_student(model, NAMES, SHAPE, x, hx, hy)
    damaged = misscale_int8(good.int8, 0.8)  # the head's weight scales 20 % low
    y_idx, _ = label_indices(NAMES, hy)
    report = check_parity(model, good.fp32, damaged, to_model_input(hx, "uint8"), y_idx,
                          x[:32], NAMES)
    assert not report.passed
    accuracy = report.checks["accuracy"]
    assert accuracy["verdict"] == "reject" and accuracy["p_value"] < 0.05
    assert accuracy["drop"] > 0.2
    assert any("int8 is worse" in f and "McNemar p" in f for f in report.failures)
    assert report.checks["agreement"]["verdict"] == "reject"
    assert report.as_dict()["checks"]["accuracy"]["fp32_only"] > 0


def test_freshness_ages_are_weighted_per_sample_and_survive_a_rejection():
    from types import SimpleNamespace as Push

    from edgecl.export.freshness import Freshness, weighted_quantile

    assert weighted_quantile([(1.0, 1), (5.0, 9)], 0.5) == 5.0
    assert weighted_quantile([(1.0, 9), (5.0, 1)], 0.5) == 1.0
    assert weighted_quantile([(1.0, 94), (5.0, 6)], 0.95) == 5.0
    fresh = Freshness()
    assert fresh.summary() is None
    batches = [Push(accepted_at=100.0, n=10), Push(accepted_at=104.0, n=30)]
    fresh.learned(batches)
    fresh.learned(batches)  # the same step seen again (an idle hook): counted once
    covered = fresh.take()
    assert [n for _, _, n in covered] == [10, 30]
    fresh.rejected(covered)  # not published: the next snapshot covers them
    fresh.learned([Push(accepted_at=108.0, n=10)])
    fresh.published(fresh.take(), at=110.0)
    age = fresh.summary()
    assert age["samples"] == 50
    assert age["median_s"] == 6.0 and age["p95_s"] == 10.0  # 10 at 10 s, 30 at 6 s, 10 at 2 s
    assert fresh.take() == []
