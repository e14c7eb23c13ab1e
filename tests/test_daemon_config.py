"""Settings: defaults, TOML, --set and flags, and errors that name the key."""
from __future__ import annotations

import argparse

import pytest

from edgecl import config as cfg
from edgecl.errors import UserError
from edgecl.cli.serve import build_config, register


def parse(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_defaults_need_no_file():
    config = cfg.load(None)
    config.check()
    assert config.serve.port == 5555 and config.input.spec() is None


def test_toml_then_set_then_flags(tmp_path):
    path = tmp_path / "edgecl.toml"
    path.write_text('[serve]\nport = 6000\nqueue_mb = 8\n[input]\nchannels = 1\nheight = 28\n'
                    'width = 28\n[learner]\nmethod = "derpp"\nbuffer_size = 100\n')
    config = build_config(parse("--config", str(path), "--set", "serve.port=6100",
                                "--set", "learner.lr=0.01", "--buffer-size", "50",
                                "--queue-mb", "4"))
    assert config.serve.port == 6100                       # --set beats the file
    assert config.serve.queue_mb == 4.0                    # a flag beats the file
    assert isinstance(config.serve.queue_mb, float)
    assert config.input.spec().height == 28 and config.input.spec().dtype == "uint8"
    assert config.learner == {"method": "derpp", "buffer_size": 50, "lr": 0.01}


@pytest.mark.parametrize("text, message", [
    ("[serve]\nprot = 1\n", "serve.prot is not a setting"),
    ("[serve]\nport = \"x\"\n", "serve.port: expected int"),
    ("[server]\nport = 1\n", "unknown section [server]"),
    ("[input]\nchannels = 1\n", "channels, height and width"),
    ("[input]\ndtype = \"int8\"\nchannels=1\nheight=2\nwidth=2\n", "input.dtype"),
    ("[serve]\nqueue_mb = -1\n", "serve.queue_mb"),
    ("port = 5\n", "must be a [table]"),
    ("[serve\n", "not valid TOML"),
])
def test_errors_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        cfg.load(path).check()


def test_unknown_learner_key_is_named():
    config = cfg.Config(learner={"buffer_sise": 3})
    with pytest.raises(UserError, match="learner.buffer_sise: unknown key"):
        config.learner_config()
    with pytest.raises(UserError, match="learner"):
        cfg.Config(learner={"method": "nonsense"}).learner_config()


def test_set_values_are_toml_or_bare_strings():
    assert cfg.parse_assignment("learner.method=derpp+ewcpp") == \
        ("learner", "method", "derpp+ewcpp")
    assert cfg.parse_assignment("serve.queue_mb=2.5") == ("serve", "queue_mb", 2.5)
    assert cfg.parse_assignment('learner.terms={derpp = {alpha = 0.2}}')[2] == \
        {"derpp": {"alpha": 0.2}}
    with pytest.raises(UserError, match="SECTION.KEY=VALUE"):
        cfg.parse_assignment("port=5")


def test_missing_config_file():
    with pytest.raises(UserError, match="does not exist"):
        cfg.load("/nonexistent/edgecl.toml")
