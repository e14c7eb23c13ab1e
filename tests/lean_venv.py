"""A real lean install (`pip install edgecl`, no extras) in its own virtual environment, for
tests/test_lean_install.py and benchmarks/lean_install.py.

pip reaches the package registry. A venv whose dependencies match pyproject's can be reused
(a cache directory): edgecl itself is reinstalled from the working tree every time.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PIP = ["-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]


def bin_path(venv: Path, name: str) -> Path:
    return venv / "bin" / name


def dependencies() -> list[str]:
    """What a plain `pip install edgecl` brings in, per pyproject.toml."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def cache_key() -> str:
    text = "\n".join([sys.version, *dependencies()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def source_copy(dest: Path) -> Path:
    """The files a source distribution holds, so the install neither reads nor writes the
    working tree (no build/ or egg-info left behind)."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "edgecl", dest / "edgecl",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def install_edgecl(venv: Path, no_deps: bool) -> None:
    """`pip install edgecl` from the working tree: a real (non-editable) install."""
    with tempfile.TemporaryDirectory(prefix="edgecl-src-") as tmp:
        src = source_copy(Path(tmp))
        cmd = [str(bin_path(venv, "python")), *PIP, "install", "--force-reinstall"]
        subprocess.run(cmd + (["--no-deps"] if no_deps else []) + [str(src)], check=True,
                       capture_output=True, text=True, timeout=900)


def build(venv: Path) -> Path:
    """A fresh venv with the lean install in it."""
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    install_edgecl(venv, no_deps=False)
    return venv


def cached(cache_dir: Path) -> Path:
    """A lean venv under cache_dir, built once per dependency list; edgecl reinstalled."""
    venv = cache_dir / f"lean-{cache_key()}"
    ready = venv / ".edgecl-deps-ready"
    if not ready.exists():
        build(venv)
        ready.touch()
    else:
        install_edgecl(venv, no_deps=True)
    return venv


def installed_distributions(venv: Path) -> set[str]:
    """Lower-cased names of every distribution in the venv."""
    code = ("import importlib.metadata as m;"
            "print('\\n'.join(sorted({d.metadata['Name'].lower() for d in m.distributions()})))")
    out = subprocess.run([str(bin_path(venv, "python")), "-c", code], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return set(out.split())
