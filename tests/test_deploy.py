"""deploy/: the example config cannot drift from the settings edgecl has, and the unit and the
container file keep the properties the README promises (restart, state directory, no root)."""
from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

from edgecl import config as config_mod
from edgecl.learn import LearnerConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
EXAMPLE = DEPLOY / "edgecl.toml"


def section_classes() -> dict:
    """Every [section] of the config and the dataclass whose fields are its settings."""
    sections = {}
    for f in dataclasses.fields(config_mod.Config):
        sections[f.name] = (LearnerConfig if f.name == "learner"
                            else type(f.default_factory()))
    return sections


def keys_named(text: str) -> dict[str, set[str]]:
    """Per [section]: the keys set, and the keys shown commented out (`# key = value`)."""
    named: dict[str, set[str]] = {}
    section = None
    for line in text.splitlines():
        header = re.match(r"^\[([\w.]+)\]", line)
        if header:
            section = header.group(1)
            named.setdefault(section, set())
            continue
        key = re.match(r"^#?\s*([a-z_][a-z0-9_]*)\s*=", line)
        if key and section:
            named[section].add(key.group(1))
    return named


def test_the_example_config_loads_and_names_every_setting():
    config = config_mod.load(EXAMPLE)   # unknown keys or wrong types fail here
    config.check()
    config.learner_config()
    assert config.serve.require_curve and config.serve.curve_secret

    text = EXAMPLE.read_text()
    named = keys_named(text)
    active = tomllib.loads(text)
    missing = []
    for section, cls in section_classes().items():
        for f in dataclasses.fields(cls):
            if f.name not in named.get(section, ()):
                missing.append(f"{section}.{f.name}")
    assert not missing, f"deploy/edgecl.toml does not mention: {', '.join(missing)}"
    # a commented-out key is one whose default TOML cannot write; everything else is set
    for section, keys in named.items():
        for key in keys - set(active.get(section, {})):
            cls = section_classes()[section]
            default = {f.name: f.default for f in dataclasses.fields(cls)}.get(key)
            assert default is None or section == "learner" and key == "terms", \
                f"{section}.{key} is commented out but has a default; set it"


def test_the_systemd_unit_restarts_keeps_state_and_runs_unprivileged():
    unit = (DEPLOY / "edgecl.service").read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", unit, re.M))
    assert settings["Restart"] == "on-failure"
    assert settings["StateDirectory"] == "edgecl"
    assert settings.get("DynamicUser") == "yes" or settings.get("User") not in (None, "root")
    assert settings["NoNewPrivileges"] == "yes" and settings["ProtectSystem"] == "strict"
    assert "edgecl serve" in settings["ExecStart"]


def test_the_container_file_runs_as_non_root_with_a_state_volume():
    text = (DEPLOY / "Containerfile").read_text()
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and user[-1] not in ("root", "0")
    assert re.search(r"^VOLUME\s+.*/var/lib/edgecl", text, re.M)
    exposed = set(re.findall(r"^EXPOSE\s+(.*)$", text, re.M)[0].split())
    assert {"5555", "5556"} <= exposed
