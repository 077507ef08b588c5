"""Start and stop real `bentoml serve` processes for the tests, and write the files they are sent."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import tifffile
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
# The bentoml beside this Python; TSIMCNE_BENTOML names another (e.g. one installed with pip --target).
BENTOML = Path(os.environ.get("TSIMCNE_BENTOML") or Path(sys.executable).with_name("bentoml"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, *texts: str, timeout: float = 90) -> str:
        """The log once it holds every one of `texts`: /readyz answers when the first worker is up, not all."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log_text()
            if all(text in log for text in texts):
                return log
            if time.monotonic() > deadline or self.process.poll() is not None:
                missing = [text for text in texts if text not in log]
                raise AssertionError(f"server log lacks {missing} after {timeout} s:\n{log[-3000:]}")
            time.sleep(0.25)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def stop_and_check_log(self) -> None:
        """Stop, then fail when the log shows a traceback or a 500: every request the server saw was answered
        without a fault of ours (what a test's server fixture checks when its tests are done)."""
        self.stop()
        log = self.log_text()
        if "Traceback" in log:
            raise AssertionError(f"the server logged a traceback:\n{log[-4000:]}")
        if "status=500" in log:
            raise AssertionError("the server answered 500 (status=500 in its log)")


def server_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TSIMCNE_")}
    env.update({"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def serve_command(args: dict[str, str], port: int, target: str = "serving.service:MapService") -> list[str]:
    command = [str(BENTOML), "serve", target, "--host", "127.0.0.1", "--port", str(port)]
    for key, value in args.items():
        command += ["--arg", f"{key}={value}"]
    return command


def start_server(
    log_dir: Path,
    args: dict[str, str],
    home: Path,
    env: dict[str, str] | None = None,
    ready_timeout: float = 90,
    serve_target: str = "serving.service:MapService",
    cwd: Path = ROOT,
) -> Server:
    """`bentoml serve TARGET` on a free loopback port; returns once /readyz says 200."""
    port = free_port()
    log = log_dir / f"server-{port}.log"
    command = serve_command(args, port, serve_target)
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            command, cwd=cwd, env=server_env(home, **(env or {})), stdout=handle, stderr=subprocess.STDOUT
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {process.returncode}:\n{server.log_text()[-3000:]}")
        try:
            if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"bentoml serve not ready after {ready_timeout} s:\n{server.log_text()[-3000:]}")


def run_server_to_exit(args: dict[str, str], home: Path, env: dict[str, str] | None = None, timeout: float = 90):
    """Run `bentoml serve` that is expected to stop by itself; returns the CompletedProcess."""
    return subprocess.run(
        serve_command(args, free_port()),
        cwd=ROOT,
        env=server_env(home, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_good_images(folder: Path, source: np.ndarray) -> list[Path]:
    """The same RGB uint8 cell written as PNG, JPEG, 16-bit TIFF, grayscale PNG and RGBA PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "cell.png": lambda p: Image.fromarray(source).save(p),
        "cell.jpg": lambda p: Image.fromarray(source).save(p, quality=95),
        "cell16.tif": lambda p: tifffile.imwrite(p, source.astype(np.uint16) * 257),
        "cell-gray.png": lambda p: Image.fromarray(source).convert("L").save(p),
        "cell-rgba.png": lambda p: Image.fromarray(source).convert("RGBA").save(p),
    }
    written = []
    for name, write in paths.items():
        write(folder / name)
        written.append(folder / name)
    return written


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's calling card), with tiny data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def write_broken_files(folder: Path, source: np.ndarray) -> dict[str, Path]:
    """Files a service must refuse cleanly: truncated JPEG, zero bytes, text, a 30000x30000 PNG header,
    plus two odd-but-valid ones it must accept: an animated GIF (first frame) and a CMYK JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = io.BytesIO()
    Image.fromarray(source).save(jpeg, format="JPEG")
    files = {
        "truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
        "empty.png": b"",
        "notes.txt": b"this is not an image\n",
        "bomb.png": _png_claiming(30000, 30000),
    }
    paths = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths[name] = folder / name
    frames = [Image.fromarray(np.roll(source, shift, axis=1)) for shift in (0, 3, 6)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.fromarray(source).convert("CMYK").save(folder / "cmyk.jpg", format="JPEG")
    paths["animated.gif"] = folder / "animated.gif"
    paths["cmyk.jpg"] = folder / "cmyk.jpg"
    return paths


def metric_value(metrics_text: str, name: str, **labels: str) -> float:
    """The value of the first sample of `name` whose labels include `labels` (0.0 when there is none)."""
    for line in metrics_text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        metric, _, label_text = sample.partition("{")
        present = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if metric == name and all(present.get(k) == v for k, v in labels.items()):
            return float(value)
    return 0.0
