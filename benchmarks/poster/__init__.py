"""benchmarks/poster: see benchmarks/README.md."""
