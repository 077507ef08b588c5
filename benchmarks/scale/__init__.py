"""benchmarks/scale: see benchmarks/README.md."""
