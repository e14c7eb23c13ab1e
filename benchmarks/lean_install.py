"""The lean install's cost on a device: a fresh venv with a plain `pip install edgecl` (pip
reaches the package registry), its size on disk, and the peak RSS of importing the client side
and onnxruntime, against the full environment this script runs in (torch).

    python benchmarks/lean_install.py            # prints, and writes BENCHMARKS.md's section
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import lean_venv  # noqa: E402  tests/: the same lean venv the test builds
from ingest import machine  # noqa: E402  benchmarks/: the same machine line everywhere
from sections import write_section  # noqa: E402

LEAN_IMPORT = ("import edgecl.client, edgecl.export.device, edgecl.cli, onnxruntime, zmq, "
               "msgpack, numpy")
FULL_IMPORT = "import edgecl.serve.daemon, edgecl.learn, edgecl.export.onnx, torch"
PEAK_RSS = "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"


def du(path: Path) -> int:
    """Bytes on disk (allocated blocks, as `du` counts them)."""
    return sum(p.lstat().st_blocks * 512 for p in path.rglob("*") if not p.is_symlink())


def site_packages(python: str) -> Path:
    out = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    return Path(out)


def peak_rss_kib(python: str, imports: str) -> int:
    """Peak RSS of a fresh interpreter that does `imports` (KiB, median of 3)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # each env's own edgecl
    if python == sys.executable:
        env["PYTHONPATH"] = str(ROOT)
    values = sorted(int(subprocess.run([python, "-c", f"{imports}; {PEAK_RSS}"], check=True,
                                       capture_output=True, text=True, cwd="/",
                                       env=env).stdout)
                    for _ in range(3))
    return values[1]


def biggest(site: Path, n: int = 5) -> list[tuple[str, int]]:
    sizes = [(p.name, du(p) if p.is_dir() else p.lstat().st_blocks * 512) for p in site.iterdir()
             if not p.name.endswith((".dist-info", ".pth")) and p.name != "__pycache__"]
    return sorted(sizes, key=lambda item: -item[1])[:n]


def measure() -> dict:
    with tempfile.TemporaryDirectory(prefix="edgecl-lean-") as tmp:
        venv = Path(tmp) / "venv"
        started = time.monotonic()
        lean_venv.build(venv)
        install_s = time.monotonic() - started
        python = str(lean_venv.bin_path(venv, "python"))
        site = site_packages(python)
        return {"install_s": install_s, "venv_bytes": du(venv), "site_bytes": du(site),
                "distributions": sorted(lean_venv.installed_distributions(venv)),
                "biggest": biggest(site),
                "lean_rss_kib": peak_rss_kib(python, LEAN_IMPORT),
                "full_site_bytes": du(site_packages(sys.executable)),
                "full_rss_kib": peak_rss_kib(sys.executable, FULL_IMPORT)}


def render(r: dict, command: str) -> str:
    mb = lambda b: f"{b / 1e6:,.0f} MB"  # noqa: E731
    top = ", ".join(f"{name} {mb(size)}" for name, size in r["biggest"])
    return "\n".join([
        "## Lean install (sensors and devices)",
        "",
        f"`{command}` on {machine()}. A fresh venv, `pip install edgecl` (no extras) from the "
        f"working tree, wheels from the package registry (pip's cache warm): {r['install_s']:.0f} s.",
        "",
        "| | lean install (`pip install edgecl`) | full environment (`.[server,...]`, torch) |",
        "|---|---|---|",
        f"| size on disk | {mb(r['venv_bytes'])} venv, {mb(r['site_bytes'])} site-packages "
        f"| {mb(r['full_site_bytes'])} site-packages |",
        f"| peak RSS of the imports | {r['lean_rss_kib'] / 1024:,.0f} MiB | "
        f"{r['full_rss_kib'] / 1024:,.0f} MiB |",
        "",
        f"Lean imports: `{LEAN_IMPORT}`. Full imports: `{FULL_IMPORT}`. Peak RSS is the median "
        "of 3 fresh interpreters (ru_maxrss).",
        f"The lean venv holds {', '.join(r['distributions'])}; its biggest parts: {top} "
        "(pip and setuptools, which every venv gets, included in the venv figure).",
        "The full environment figure is whatever the environment running the script holds "
        "(the shared development venv, with test and plot packages too), so it is an upper "
        "bound on `pip install 'edgecl[server]'`.",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    text = render(measure(), "python benchmarks/lean_install.py")
    print(text)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", "lean-install", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
