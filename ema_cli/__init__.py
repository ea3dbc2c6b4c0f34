"""ema-avg: offline checkpoint averaging (EMA, SWA, weighted, per-step and post-hoc EMA).

The Python API (``ema_cli.average``, ``plan``, ``posthoc``, ``inspect``,
``restore_map``, ``rename`` and their result types) lives in
:mod:`ema_cli.api`; it is imported on first use, so ``import ema_cli`` stays
cheap (no numpy, typer or rich).
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = (
    "average", "plan", "posthoc", "inspect", "restore_map", "rename", "watch", "expand_path",
    "Result", "Plan", "Select", "CheckpointRow", "TensorRow", "RenameResult", "Progress", "EmaWarning",
)
__all__ = ["__version__", "EmaError", *_API]


def __getattr__(name: str):
    if name == "EmaError":
        from ema_cli.errors import EmaError

        return EmaError
    if name == "inspect":  # the module ema_cli/inspect.py, callable as the API's inspect(path)
        import importlib

        return importlib.import_module("ema_cli.inspect")
    if name in _API:
        from ema_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'ema_cli' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
