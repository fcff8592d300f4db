"""The benchmarks, each run from the repository root as `python -m bench.NAME` (`--help`
says what it measures). Their figures are in docs/performance.md."""
