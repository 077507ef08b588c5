"""serving/service.py does nothing at import: no settings read, no bundle hashed, no environment changed.
The service is made when `MapService` is asked for, as `bentoml serve` does at start-up."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TSIMCNE_") and k != "OPENBLAS_NUM_THREADS"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=120
    )


def test_importing_the_service_module_does_no_work() -> None:
    result = _python(
        "import os, serving.service as s\n"
        "assert 'OPENBLAS_NUM_THREADS' not in os.environ, 'environment changed at import'\n"
        "assert 'MapService' not in vars(s), 'service made at import'\n"
        "print('imported cleanly')",
        TSIMCNE_MAX_IMAGES="not a number",  # would stop the process if settings were read at import
    )
    assert result.returncode == 0, result.stderr
    assert "imported cleanly" in result.stdout


def test_asking_for_the_service_reads_the_settings_then() -> None:
    result = _python("import serving.service as s\ns.MapService", TSIMCNE_MAX_IMAGES="not a number")
    assert result.returncode == 1 and "TSIMCNE_MAX_IMAGES" in result.stderr and "Traceback" not in result.stderr
    result = _python("import serving.service as s\ns.MapService")
    assert result.returncode == 1 and "error: no bundle to serve" in result.stderr


def test_the_service_is_made_for_a_bundle_at_start_up(service_bundle) -> None:
    bundle, _ = service_bundle
    result = _python(
        "import os, serving.service as s\n"
        "service = s.MapService\n"
        "assert s.MapService is service and service.name == 'tsimcne'\n"
        "assert os.environ['OPENBLAS_NUM_THREADS'] == '1'\n"
        "print(sorted(service.apis))",
        TSIMCNE_BUNDLE=str(bundle),
    )
    assert result.returncode == 0, result.stderr
    assert "['embed']" in result.stdout
