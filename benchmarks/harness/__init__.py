"""What benchmarks and tests share: real `bentoml serve` processes, the `tsimcne` command, Chromium, and the
files they are sent. Tests import it; it imports no test module."""
