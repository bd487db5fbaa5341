"""One module per suite, each with ``run(ctx: benchmarks.harness.Context) -> None``; listed in ``benchmarks.SUITES``."""
