"""`edgecl methods`, and choosing terms and their parameters from the bench CLI and the
daemon's config file."""
import json

import pytest
from test_bench import tiny_split_mnist

from edgecl import config as config_mod
from edgecl.cli import main
from edgecl.learn import OnlineLearner
from edgecl.learn.terms import TERMS


def test_methods_lists_every_term_with_defaults_and_memory(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert "default student" in header and "1x28x28" in header and "10 classes" in header
    for name, cls in TERMS.items():
        assert f"\n{name} " in out and cls.describe in out
    assert "parameters: lam = 1.0, alpha = 0.9, fisher_every = 10" in out
    assert "replay buffer holds 840 bytes per sample" in out  # 784 input + 8 + 8 + 10 logits


def test_methods_json_memory_is_floats_per_parameter_of_the_student(capsys):
    assert main(["methods", "--json", "--input", "3x32x32", "--classes", "100"]) == 0
    table = json.loads(capsys.readouterr().out)
    n = table["student_params"]
    terms = {t["name"]: t for t in table["terms"]}
    assert set(terms) == set(TERMS)
    assert terms["ewcpp"]["memory_bytes"] == 2 * 4 * n  # Fisher + anchor, float32
    assert terms["si"]["memory_bytes"] == 5 * 4 * n
    assert terms["rwalk"]["memory_bytes"] == 6 * 4 * n
    assert terms["ewc"]["memory_bytes"] == 2 * 4 * n + 200 * (3 * 32 * 32 + 8)
    assert terms["derpp"]["memory_bytes"] == 0
    assert terms["ewc"]["defaults"] == TERMS["ewc"].defaults


@pytest.mark.parametrize("argv,message", [
    (["--input", "28x28"], "--input must be CxHxW"),
    (["--classes", "0"], "--classes"),
])
def test_methods_bad_arguments_are_one_line(argv, message, capsys):
    assert main(["methods", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_config_file_picks_terms_and_per_term_weights(tmp_path):
    path = tmp_path / "edgecl.toml"
    path.write_text('[learner]\nmethod = "derpp+ewcpp+si"\n'
                    '[learner.terms.si]\nlam = 2\nxi = 0.5\n'
                    '[learner.terms.derpp]\nalpha = 0.1\n')
    learner = OnlineLearner(config_mod.load(path).learner_config())
    terms = {t.name: t for t in learner.terms}
    assert list(terms) == ["derpp", "ewcpp", "si"]
    assert (terms["si"].lam, terms["si"].xi, terms["derpp"].alpha) == (2, 0.5, 0.1)
    assert terms["ewcpp"].lam == TERMS["ewcpp"].defaults["lam"]


@pytest.mark.parametrize("toml,message", [
    ('method = "derpp+si"\n[learner.terms.si]\nlamda = 2.0\n',
     "si: unknown parameter(s) lamda; known: lam, xi"),
    ('method = "derpp+si"\n[learner.terms.si]\nlam = "strong"\n', "si.lam: expected float"),
    ('method = "derpp+nope"\n', "unknown term 'nope'"),
    ('method = "derpp"\n[learner.terms.si]\nlam = 2.0\n', "not in method"),
])
def test_serve_names_a_bad_term_or_parameter_in_one_line(toml, message, tmp_path, capsys):
    path = tmp_path / "edgecl.toml"
    path.write_text("[learner]\n" + toml)
    argv = ["serve", "--config", str(path), "--port", "0", "--state-dir", str(tmp_path / "s")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgecl: error:") and message in err[0]


def test_bench_cli_runs_a_combination_with_per_term_parameters(monkeypatch, capsys):
    import edgecl.bench as bench
    tiny_split_mnist(monkeypatch, train_per_class=10)
    monkeypatch.setattr(bench, "baseline_rss_mb", lambda: 0.0)
    seen = []

    def in_process(method, buffer, seeds, teacher, **kw):
        kw.pop("progress"), kw.pop("jobs")
        kw.pop("orders", None)  # the home cut
        run = bench.run_split_mnist(method, buffer, seeds[0], teacher, **kw)
        seen.append(run["config"]["terms"])
        return bench.summarize([run])

    monkeypatch.setattr(bench, "run_many", in_process)
    argv = ["bench", "split-mnist", "--method", "derpp+ewcpp+si", "--buffer", "10",
            "--seeds", "0", "--quiet",
            "--set", '{"threads": 1, "terms": {"si": {"lam": 3.0}}}']
    assert main(argv) == 0
    assert seen == [{"si": {"lam": 3.0}}]
    out = capsys.readouterr().out
    assert "| derpp+ewcpp+si | 10 | none |" in out and "Task-IL" in out
