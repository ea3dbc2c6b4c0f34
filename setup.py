"""The package's one compiled part, ema_cli._ckernel (the fused bfloat16 kernel,
plain C over the buffer protocol: no numpy headers, no build dependency beyond
setuptools).  Everything else is declared in pyproject.toml; an extension is
declared here because setuptools' pyproject ``ext-modules`` table is still
experimental.

optional=True: without a working C compiler the install goes on, and ema-avg
runs the pure-numpy kernel (the same bits, slower on bf16; ema_cli/kernel.py).
-ffp-contract=off: no fused multiply-add, so every product and every sum is
rounded in float64, as the numpy path rounds them."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("ema_cli._ckernel", ["ema_cli/_ckernel.c"], optional=True,
                             extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno"])])
