"""The bundle's network in onnxruntime: choosing the execution provider and running batches. No torch.

Providers: "cpu", "cuda" (refuses to run if CUDA was asked for but not obtained) or "auto" (CUDA when
onnxruntime can use it, else CPU); `provider` reports what the session actually got.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from tsimcne_core.bundle_format import BundleError

PROVIDERS = ("auto", "cpu", "cuda")


class ModelSession:
    """One onnxruntime session of a bundle's model.onnx: float32 (N, 3, H, W) -> the named outputs."""

    def __init__(
        self, model_file: Path, provider: str = "auto", threads: int = 0, spin: bool = True, input_name: str = "images"
    ) -> None:
        """threads: onnxruntime's intra-op threads (0: its choice, all physical cores). spin=False: idle
        threads sleep instead of spinning, which a service sharing its CPU cores with HTTP handling needs
        (spinning threads would take the cores from the event loop)."""
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
        if provider not in PROVIDERS:
            raise BundleError(f"provider {provider!r}: choose auto, cpu or cuda")
        wanted = ["CPUExecutionProvider"]
        if provider == "cuda" or (provider == "auto" and "CUDAExecutionProvider" in ort.get_available_providers()):
            if hasattr(ort, "preload_dlls"):
                # Missing CUDA libraries are not fatal here: the provider check below decides.
                with contextlib.suppress(Exception):
                    ort.preload_dlls()
            wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(model_file), options, providers=wanted)
        self.provider = self.session.get_providers()[0]
        if provider == "cuda" and self.provider != "CUDAExecutionProvider":
            raise BundleError("CUDA was requested but onnxruntime could not use it (no GPU or CUDA 13/cuDNN 9 missing)")
        self.input_name = input_name

    def run(self, outputs: list[str], batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(outputs, {self.input_name: batch})
