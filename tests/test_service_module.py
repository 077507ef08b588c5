"""serving/service.py defines `MapService` at module level and does nothing else at import: no settings read,
no bundle hashed, no environment changed. The settings are read when the server starts (`inject_config`,
which `bentoml serve` and `bentoml build` call)."""

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


def test_importing_the_service_module_defines_the_service_and_does_no_work() -> None:
    result = _python(
        "import os, bentoml, serving.service as s\n"
        "assert 'OPENBLAS_NUM_THREADS' not in os.environ, 'environment changed at import'\n"
        "assert isinstance(s.MapService, bentoml.Service) and s.MapService.name == 'tsimcne'\n"
        "assert s.service_settings.cache_info().currsize == 0, 'settings read at import'\n"
        "print(sorted(s.MapService.apis))",
        TSIMCNE_MAX_IMAGES="not a number",  # would stop the process if settings were read at import
    )
    assert result.returncode == 0, result.stderr
    assert "['embed']" in result.stdout


def test_starting_the_server_reads_the_settings_then() -> None:
    result = _python("import serving.service as s\ns.MapService.inject_config()", TSIMCNE_MAX_IMAGES="not a number")
    assert result.returncode == 1 and "TSIMCNE_MAX_IMAGES" in result.stderr and "Traceback" not in result.stderr
    result = _python("import serving.service as s\ns.MapService.inject_config()")
    assert result.returncode == 1 and "error: no bundle to serve" in result.stderr


def test_the_settings_configure_the_service_at_start_up(service_bundle) -> None:
    bundle, _ = service_bundle
    result = _python(
        "import os, serving.service as s\n"
        "s.MapService.inject_config()\n"
        "s.MapService.inject_config()  # every worker calls it again: configured once\n"
        "assert os.environ['OPENBLAS_NUM_THREADS'] == '1'\n"
        "assert s.MapService.config['workers'] == 3, s.MapService.config\n"
        "assert s.MapService.config['logging'] == {'access': {'enabled': True}}\n"
        "print(len(s.MapService.middlewares))",
        TSIMCNE_BUNDLE=str(bundle),
        TSIMCNE_WORKERS="3",
        TSIMCNE_ACCESS_LOG="true",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2"]  # the token guard and the body-size guard, each once
