"""Loaded at start-up by every Python process of a test's `bentoml serve` (its PYTHONPATH names this folder):
counts the multipart parsers made, one line per construction in $TSIMCNE_TEST_PARSER_LOG, so a test can check
from outside that each request's body is parsed exactly once (BentoML's own parsing included: starlette's
form parser makes one of these too)."""

import os

_log = os.environ.get("TSIMCNE_TEST_PARSER_LOG")
if _log:
    try:
        from python_multipart import multipart as _multipart
    except ImportError:
        _multipart = None
    if _multipart is not None:
        _made = _multipart.MultipartParser.__init__

        def _counting_init(self, *args, **kwargs):
            with open(_log, "a") as handle:
                handle.write(f"{os.getpid()}\n")
            _made(self, *args, **kwargs)

        _multipart.MultipartParser.__init__ = _counting_init
