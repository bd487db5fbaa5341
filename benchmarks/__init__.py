"""lit_accel's benchmark suites: ``python -m benchmarks run SUITE... [--smoke]``, ``python -m benchmarks render``.

See ``benchmarks/README.md``.
"""
