"""One `cvr serve` child process for bench/serve.py: started on a free loopback port with one
thread, waited for on /readyz, read on /metrics and /proc, stopped with SIGTERM by its own pid."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench import common

READY_TIMEOUT_S = 600  # model loading on a busy 2-core machine
STOP_TIMEOUT_S = 60



def _env() -> dict:
    return dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _tail(path: str, lines: int = 5) -> str:
    try:
        return " | ".join(Path(path).read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def proc_status(pid: int) -> dict:
    """VmHWM (RSS high-water) and VmRSS of a live process, in MB."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="utf-8") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) / 1024  # kB -> MB
    return out


class Server:
    """One `cvr serve` child on a free loopback port; `stop()` sends SIGTERM to its own pid."""

    def __init__(self, name: str, argv: list, log_path: str):
        self.name, self.log_path = name, log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w", encoding="utf-8")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", *argv, "--host", "127.0.0.1",
                                      "--port", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=_env(), cwd=common.REPO)

    def wait_ready(self) -> float:
        import httpx

        deadline = time.perf_counter() + READY_TIMEOUT_S
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited ({self.proc.returncode}) before ready: "
                                   f"{_tail(self.log_path)}")
            try:
                answer = httpx.get(self.url + "/readyz", timeout=5)
                if answer.status_code == 200 and answer.json().get("status") == "ready":
                    self.ready = answer.json()
                    return round(time.perf_counter() - self.started, 1)
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server {self.name} not ready after {READY_TIMEOUT_S} s: {_tail(self.log_path)}")

    def metrics(self) -> dict:
        """The server's Prometheus samples: {'name{labels}': value}."""
        import httpx

        samples = {}
        for line in httpx.get(self.url + "/metrics", timeout=30).text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def stop(self) -> dict:
        """SIGTERM by pid, then wait (uvicorn drains); SIGKILL only if it does not exit in time."""
        measured = {}
        if self.proc.poll() is None:
            measured = {**proc_status(self.proc.pid), "cpu_s": common.process_cpu_seconds(self.proc.pid)}
            clock = time.perf_counter()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
                measured["stop_s"] = round(time.perf_counter() - clock, 2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                measured["killed"] = True
        self.log.close()
        log = Path(self.log_path).read_text(errors="replace")
        # uvicorn re-raises the SIGTERM it caught once it has shut down gracefully: exit -15 is a clean stop.
        clean = self.proc.returncode in (0, -signal.SIGTERM) and not measured.get("killed")
        return {**measured, "exit_code": self.proc.returncode, "clean_stop": clean,
                "tracebacks": log.count("Traceback"), "log_tail": log.strip().splitlines()[-5:]}
