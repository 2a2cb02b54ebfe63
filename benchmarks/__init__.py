"""Performance harness: ``python -m benchmarks.NAME`` writes ``results/NAME.json`` and a section of ``RESULTS.md``."""
