"""The class-aware aggregation against plain FedAvg, on hand-made site models."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr")  # the federation extra; records.py needs it

from edgecl.federation.aggregate import SiteModel, aggregate, label_order  # noqa: E402
from edgecl.federation.records import content_global, content_site, global_content, \
    site_content  # noqa: E402


def site(labels, counts, learned, backbone, rows, name="s", arch="a"):
    rows = np.asarray(rows, dtype=np.float32)
    return SiteModel(list(labels), list(counts), learned,
                     {"body.w": np.full(3, backbone, np.float32),
                      "head.weight": rows, "head.bias": rows[:, 0].copy()},
                     arch=arch, name=name)


def test_labels_are_aligned_by_name_whatever_each_head_order():
    a = site([3, 1], [10, 10], 10, 0.0, [[3, 3], [1, 1]])
    b = site([1, "x"], [10, 10], 10, 0.0, [[1, 1], [7, 7]])
    glob = aggregate([a, b])
    assert glob.labels == label_order([b, a]) == [1, 3, "x"]
    np.testing.assert_allclose(glob.arrays["head.weight"], [[1, 1], [3, 3], [7, 7]])
    assert glob.counts == [20, 10, 10]


def test_backbone_is_weighted_by_what_each_site_learned_since_the_last_round():
    a = site([0], [5], 30, 1.0, [[0, 0]])
    b = site([1], [5], 10, 5.0, [[0, 0]])
    glob = aggregate([a, b])
    np.testing.assert_allclose(glob.arrays["body.w"], 0.75 * 1.0 + 0.25 * 5.0)
    idle = aggregate([site([0], [5], 0, 1.0, [[0, 0]]), site([1], [5], 0, 5.0, [[0, 0]])])
    np.testing.assert_allclose(idle.arrays["body.w"], 3.0)  # nobody learned: equal weights


def test_a_row_is_averaged_only_over_the_sites_that_learned_that_class():
    # site b grew a row for class 0 from an earlier merge but never learned a sample of it
    a = site([0, 1], [90, 10], 100, 0.0, [[4, 4], [1, 1]])
    b = site([0, 2], [0, 50], 50, 0.0, [[-9, -9], [2, 2]])
    c = site([1], [30], 30, 0.0, [[3, 3]])
    aware = aggregate([a, b, c], "class-aware")
    np.testing.assert_allclose(aware.arrays["head.weight"][0], [4, 4])       # only a's row
    np.testing.assert_allclose(aware.arrays["head.weight"][1], [2.5, 2.5])   # 10:30 weights
    plain = aggregate([a, b, c], "fedavg")
    # plain FedAvg blurs class 0 with b's untrained row and c's missing (zero) row
    expected = (100 * 4 + 50 * -9 + 30 * 0) / 180
    np.testing.assert_allclose(plain.arrays["head.weight"][0], [expected] * 2, rtol=1e-6)


def test_batchnorm_variance_is_the_variance_of_the_union_of_the_sites_inputs():
    rng = np.random.default_rng(0)
    inputs = [rng.normal(m, s, (n, 2)) for m, s, n in ((0.0, 1.0, 300), (3.0, 0.5, 100))]
    sites = []
    for x in inputs:
        one = site([0], [1], len(x), 0.0, [[0, 0]])
        one.arrays["bn.running_mean"] = x.mean(0).astype(np.float32)
        one.arrays["bn.running_var"] = x.var(0).astype(np.float32)
        sites.append(one)
    union = np.concatenate(inputs)
    glob = aggregate(sites)
    np.testing.assert_allclose(glob.arrays["bn.running_mean"], union.mean(0), rtol=1e-5)
    np.testing.assert_allclose(glob.arrays["bn.running_var"], union.var(0), rtol=1e-5)
    assert glob.arrays["bn.running_var"].dtype == np.float32
    plain = aggregate(sites, bn_variance="mean")  # what the union adds: the means' spread
    np.testing.assert_allclose(plain.arrays["bn.running_var"],
                               0.75 * inputs[0].var(0) + 0.25 * inputs[1].var(0), rtol=1e-5)
    assert (glob.arrays["bn.running_var"] > plain.arrays["bn.running_var"] + 1).all()


def test_sites_running_other_students_are_refused():
    with pytest.raises(ValueError, match="another student"):
        aggregate([site([0], [1], 1, 0.0, [[0, 0]], arch="a"),
                   site([1], [1], 1, 0.0, [[0, 0]], arch="b")])
    with pytest.raises(ValueError, match="strategy"):
        aggregate([site([0], [1], 1, 0.0, [[0, 0]])], "median")


def test_models_survive_the_flower_records_both_ways():
    a = site([2, "cat"], [4, 6], 10, 0.5, [[1, 2], [3, 4]], name="barn")
    back = content_site(site_content(a, samples_learned=99))
    assert (back.labels, back.counts, back.learned_since_merge, back.name) == \
        ([2, "cat"], [4, 6], 10, "barn")
    np.testing.assert_array_equal(back.arrays["head.weight"], a.arrays["head.weight"])
    glob = aggregate([a])
    from flwr.app import ConfigRecord
    again = content_global(global_content(glob, ConfigRecord({"merge-id": "r1"})))
    assert again.labels == [2, "cat"] and again.counts == [4, 6]
    assert content_global(global_content(None, ConfigRecord())) is None
