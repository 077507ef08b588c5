"""The project's benchmarks: each measures one claim against a floor or the reference, run as
`python -m benchmarks.<name>` or by path, and writes its figures with the machine, date and command."""
