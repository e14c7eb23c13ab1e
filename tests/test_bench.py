import json

import numpy as np
import pytest

from edgecl.bench import evaluate, format_table, run_split_mnist, summarize
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


def tiny_split_mnist(monkeypatch, train_per_class=20, test_per_task=40):
    """Make the bench run two pairs on a few digits, with a short test set per pair."""
    import dataclasses

    import edgecl.data as data
    real = data.split_mnist

    def tiny(seed, order=0):
        s = real(seed, train_per_class=train_per_class, tasks=[(0, 1), (2, 3)], order=order)
        keep = np.concatenate([np.flatnonzero(s.test_task == t)[:test_per_task]
                               for t in range(2)])
        return dataclasses.replace(s, test_x=s.test_x[keep], test_y=s.test_y[keep],
                                   test_task=s.test_task[keep])

    monkeypatch.setattr(data, "split_mnist", tiny)


def test_bench_run_reports_what_the_issue_asks(monkeypatch):
    tiny_split_mnist(monkeypatch)
    r = run_split_mnist("derpp+ewcpp", buffer=20, seed=0)
    for key in ("final_acc", "acc_matrix", "forgetting", "samples_per_s", "buffer_bytes",
                "peak_rss_mb"):
        assert key in r
    assert np.array(r["acc_matrix"]).shape == (2, 2)
    assert r["acc_matrix"][0][1] == 0.0  # nothing known of the second pair after the first
    assert np.array(r["task_acc_matrix"]).shape == (2, 2)
    # an argmax right over every class is right within the image's pair
    assert r["final_task_acc"] >= r["final_acc"]
    assert r["term_params"]["ewcpp"]["lam"] == 1.0  # the defaults in force are recorded
    s = summarize([r, {**r, "seed": 1, "final_acc": r["final_acc"] + 2}])
    assert s["final_avg_acc"] == pytest.approx(r["final_acc"] + 1)


@pytest.mark.parametrize("argv,message", [
    (["--method", "nope"], "unknown term"),
    (["--set", "{bad"], "JSON object"),
    (["--set", '{"colour": 1}'], "'colour'"),
    (["--seeds", "a"], "--seeds"),
    (["--method", "derpp+kd", "--teacher", "none"], "teacher is 'none'"),
    (["--method", "derpp+ewcpp+si", "--set", '{"terms": {"si": {"lamda": 1}}}'],
     "si: unknown parameter(s) lamda"),
    (["--method", "derpp+si", "--set", '{"terms": {"si": {"lam": "big"}}}'], "si.lam"),
    (["--jobs", "0"], "--jobs"),
    (["--orders", "-1"], "--orders"),
    (["--order-ids", "1,x"], "--order-ids"),
    (["--train-per-class", "0"], "--train-per-class"),
    (["--size", "2"], "--size"),
])
def test_bench_cli_errors_are_one_line(argv, message, capsys, monkeypatch):
    import edgecl.bench as bench
    monkeypatch.setattr(bench, "baseline_rss_mb", lambda: 0.0)
    monkeypatch.setattr(bench, "run_many", lambda method, buffer, seeds, teacher, **kw:
                        run_split_mnist(method, buffer, seeds[0], teacher))
    assert main(["bench", "split-mnist", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("edgecl: error:") and message in err[-1]


class _FixedLogits:
    """A learner stand-in whose student answers row i of `table` for an input holding i."""

    def __init__(self, table, labels):
        import torch

        class Student(torch.nn.Module):
            def forward(self, x):
                return torch.tensor(table, dtype=torch.float32)[x.flatten().long()]

        self.student = Student()
        self.labels = labels
        self.index = {label: i for i, label in enumerate(labels)}

    def eval_model(self):
        return self.student.eval()

    def _to_tensor(self, raw):
        import torch
        return torch.from_numpy(raw).float()


def test_task_il_masks_each_prediction_to_its_pair():
    pairs = [(0, 1), (2, 3)]
    table = [[2, 1, 5, 0],   # a 0: overall argmax 2 (wrong), within (0, 1) argmax 0 (right)
             [0, 3, 1, 0],   # a 1: right both ways
             [9, 0, 1, 0],   # a 2: overall 0 (wrong), within (2, 3) 2 (right)
             [0, 0, 0, 1]]   # a 3: right both ways
    learner = _FixedLogits(table, [0, 1, 2, 3])
    x = np.arange(4).reshape(4, 1, 1, 1)
    y, pair = np.array([0, 1, 2, 3]), np.array([0, 0, 1, 1])
    assert evaluate(learner, x, y, pair, pairs) == (50.0, 100.0)


def test_task_il_counts_unseen_classes_wrong():
    learner = _FixedLogits([[1, 0, 0], [0, 0, 1]], [0, 1, 2])  # class 3 never seen
    x = np.arange(2).reshape(2, 1, 1, 1)
    # a 3 whose pair (2, 3) offers only class 2: wrong both ways; pair (4, 5): nothing seen
    assert evaluate(learner, x, np.array([3, 5]), np.array([1, 2]),
                    [(0, 1), (2, 3), (4, 5)]) == (0.0, 0.0)


def test_table_has_task_il_beside_class_il_and_reads_old_results():
    run = {"method": "si", "buffer": 0, "teacher": "none", "seed": 0, "final_acc": 19.5,
           "final_task_acc": 97.25, "forgetting": 90.0, "samples_per_s": 80.0,
           "prequential_acc": 80.0, "peak_rss_mb": 900.0, "buffer_bytes": 0,
           "terms_bytes": 123}
    old = {k: v for k, v in run.items() if k != "final_task_acc"}
    table = format_table([summarize([run, {**run, "seed": 1, "final_task_acc": 98.75}]),
                          summarize([old])], 800.0).splitlines()
    assert "| Class-IL acc % | worst run % | Task-IL acc % |" in table[0]
    assert "| 2 | 19.5 ± 0.0 | 19.5 | 98.0 ± 1.1 |" in table[2]
    assert "| 1 | 19.5 ± 0.0 | 19.5 | – |" in table[3]


def test_random_orders_draw_their_own_pairs_and_cuts():
    from edgecl.data import protocol_tasks
    home = split_mnist(seed=0)
    seen_pairings = set()
    for order in (1, 2, 3):
        tasks = protocol_tasks(order)
        assert sorted(d for pair in tasks for d in pair) == list(range(10))
        seen_pairings.add(tuple(tasks))
        s = split_mnist(seed=0, order=order)
        assert s.tasks == tasks and len(s.train_x) == 4000 and len(s.test_x) == 1000
        # each pair arrives whole, in the order's sequence
        assert [tuple(sorted(set(s.train_y[s.train_task == t]))) for t in range(5)] == \
            [tuple(sorted(p)) for p in tasks]
        # its own per-class cut: a test digit of the home cut is now a training digit
        assert not np.array_equal(np.sort(s.test_x.reshape(1000, -1).sum(1)),
                                  np.sort(home.test_x.reshape(1000, -1).sum(1)))
        # the same order number gives the same stream; the seed only reorders within pairs
        np.testing.assert_array_equal(split_mnist(seed=0, order=order).train_y, s.train_y)
        np.testing.assert_array_equal(split_mnist(seed=5, order=order).test_y, s.test_y)
    assert len(seen_pairings) == 3 and protocol_tasks(0) == home.tasks


def test_resize_area_averages_what_each_pixel_covers():
    from edgecl.data import resize_area
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    np.testing.assert_allclose(resize_area(x, 2)[0, 0], [[2.5, 4.5], [10.5, 12.5]])
    digits = split_mnist(seed=0).train_x[:5]
    small = resize_area(digits, 8)
    assert small.shape == (5, 1, 8, 8) and small.dtype == np.uint8
    # area resampling keeps the mean brightness (up to rounding)
    assert abs(float(small.mean()) - float(digits.mean())) < 1.0


def test_protocol_stream_shifts(monkeypatch):
    from edgecl.bench import protocol_stream
    short8 = protocol_stream(seed=0, order=2, train_per_class=30, size=8)
    assert short8.train_x.shape == (300, 1, 8, 8) and short8.test_x.shape == (1000, 1, 8, 8)
    assert np.bincount(short8.train_y).tolist() == [30] * 10
    iid = protocol_stream(seed=0, order=2, train_per_class=30, size=8, iid=True)
    assert sorted(iid.train_y.tolist()) == sorted(short8.train_y.tolist())
    # no class order left: the first 50 samples already hold most classes
    assert len(set(iid.train_y[:50].tolist())) >= 8 and not iid.train_task.any()


def test_bench_cli_runs_orders_and_reports_the_worst(monkeypatch, capsys, tmp_path):
    import edgecl.bench as bench
    tiny_split_mnist(monkeypatch, train_per_class=10)
    monkeypatch.setattr(bench, "baseline_rss_mb", lambda: 0.0)
    monkeypatch.setattr(bench, "run_each", lambda runs, jobs=1: (
        (kw, run_split_mnist(**kw)) for kw in runs))
    out_json = tmp_path / "r.json"
    assert main(["bench", "split-mnist", "--method", "er", "--buffer", "10", "--seeds", "0",
                 "--orders", "2", "--size", "14", "--quiet", "--json", str(out_json)]) == 0
    result = json.loads(out_json.read_text())["results"][0]
    assert [r["order"] for r in result["runs"]] == [1, 2] and result["orders"] == [1, 2]
    assert all(r["size"] == 14 for r in result["runs"])
    assert result["final_acc_worst"] == min(r["final_acc"] for r in result["runs"])
    assert "| worst run % |" in capsys.readouterr().out
