"""ema-avg: offline checkpoint averaging (EMA, SWA, weighted, per-step and post-hoc EMA)."""

__version__ = "0.1.0"
