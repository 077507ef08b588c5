"""benchmarks/flagging: see benchmarks/README.md."""
