"""`edgecl federate app | tls | node-key`: the files a real federation is set up with."""
from __future__ import annotations

import stat
import tomllib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, \
    load_ssh_private_key, load_ssh_public_key

from edgecl.cli import main
from edgecl.federation.server_app import RUN_DEFAULTS, run_settings


def test_app_dir_names_edgecls_apps_and_its_run_config_matches_the_defaults(tmp_path, capsys):
    assert main(["federate", "app", str(tmp_path / "app")]) == 0
    conf = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())
    assert conf["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "edgecl.federation.server_app:app",
        "clientapp": "edgecl.federation.client_app:app"}
    assert conf["tool"]["flwr"]["app"]["config"] == RUN_DEFAULTS
    assert "flwr run" in capsys.readouterr().out


def test_bad_run_config_fails_the_run_with_a_message():
    with pytest.raises(ValueError, match="strategy must be one of"):
        run_settings({"strategy": "median"})
    with pytest.raises(ValueError, match="num-rounds"):
        run_settings({"num-rounds": 0})
    with pytest.raises(ValueError, match="calibration must be one of"):
        run_settings({"calibration": "platt"})
    with pytest.raises(ValueError, match="calibration-rank"):
        run_settings({"calibration-rank": 65})


def test_tls_files_chain_to_the_ca_and_name_the_hosts(tmp_path):
    assert main(["federate", "tls", str(tmp_path), "--host", "fl.example.org",
                 "--host", "10.0.0.7"]) == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl.example.org" in names.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    key = load_pem_private_key((tmp_path / "server.key").read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    assert stat.S_IMODE((tmp_path / "server.key").stat().st_mode) == 0o600


def test_node_key_is_the_p384_openssh_pair_flower_loads(tmp_path):
    assert main(["federate", "node-key", str(tmp_path), "--name", "barn-3"]) == 0
    private = load_ssh_private_key((tmp_path / "barn-3").read_bytes(), None)
    public = load_ssh_public_key((tmp_path / "barn-3.pub").read_bytes())
    assert isinstance(private.curve, ec.SECP384R1)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert stat.S_IMODE((tmp_path / "barn-3").stat().st_mode) == 0o600
