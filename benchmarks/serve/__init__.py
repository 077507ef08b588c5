"""benchmarks/serve: see benchmarks/README.md."""
