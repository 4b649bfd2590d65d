"""Benchmarks against peers (not part of the test run); run from the repository root as modules,
e.g. `python -m bench.bench_ssm`, so that `runtime` and `tests.fixtures` import as packages."""
