import json

import numpy as np
import pytest

from edgecl.bench import run_split_mnist, summarize
from edgecl.cli import main
from edgecl.data import load_mnist5k, split_mnist
from edgecl.learn.metrics import average_forgetting


def test_mnist5k_is_real_and_balanced():
    x, y = load_mnist5k()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [500] * 10
    assert 0 < x.mean() < 255


def test_split_mnist_protocol():
    s = split_mnist(seed=1)
    assert len(s.train_x) == 4000 and len(s.test_x) == 1000
    assert s.tasks == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    # pairs arrive in order, and the test split is the same for every seed
    assert np.all(np.diff(s.train_task) >= 0)
    assert set(s.train_y[s.train_task == 2]) == {4, 5}
    np.testing.assert_array_equal(split_mnist(seed=2).test_y, s.test_y)


def test_average_forgetting():
    acc = np.array([[90, 0, 0], [70, 95, 0], [60, 80, 99]])
    assert average_forgetting(acc) == pytest.approx(((90 - 60) + (95 - 80)) / 2)


def test_bench_run_reports_what_the_issue_asks(monkeypatch):
    import edgecl.data as data
    real = data.split_mnist
    monkeypatch.setattr(data, "split_mnist",
                        lambda seed: real(seed, train_per_class=20, tasks=[(0, 1), (2, 3)]))
    r = run_split_mnist("derpp+ewcpp", buffer=20, seed=0)
    for key in ("final_acc", "acc_matrix", "forgetting", "samples_per_s", "buffer_bytes",
                "peak_rss_mb"):
        assert key in r
    assert np.array(r["acc_matrix"]).shape == (2, 2)
    assert r["acc_matrix"][0][1] == 0.0  # nothing known of the second pair after the first
    s = summarize([r, {**r, "seed": 1, "final_acc": r["final_acc"] + 2}])
    assert s["final_avg_acc"] == pytest.approx(r["final_acc"] + 1)


@pytest.mark.parametrize("argv,message", [
    (["--method", "nope"], "unknown term"),
    (["--set", "{bad"], "JSON object"),
    (["--set", '{"colour": 1}'], "'colour'"),
    (["--seeds", "a"], "--seeds"),
    (["--method", "derpp+kd", "--teacher", "none"], "teacher is 'none'"),
])
def test_bench_cli_errors_are_one_line(argv, message, capsys, monkeypatch):
    import edgecl.bench as bench
    monkeypatch.setattr(bench, "baseline_rss_mb", lambda: 0.0)
    monkeypatch.setattr(bench, "run_many", lambda method, buffer, seeds, teacher, **kw:
                        run_split_mnist(method, buffer, seeds[0], teacher))
    assert main(["bench", "split-mnist", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("edgecl: error:") and message in err[-1]
