"""`cvr serve` as a process: it refuses to start where it should not, drains requests in flight on
SIGTERM, and leaves a background index job's gallery whole (committed batches kept, the rest left
for the next run)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from engine.cli import main

# uvicorn drains, shuts the app down, then re-raises the signal: the exit status says SIGTERM ended it.
STOPPED = (0, -signal.SIGTERM)
SHIPPED = os.path.join(os.path.dirname(__file__), "..", "engine", "weights", "retrieval", "builtin")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("serve_demo") / "demo")
    assert main(["demo", "--out", out, "--videos", "30", "--quiet"]) == 0
    return out


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(gallery: str, *flags) -> tuple:
    port = _free_port()
    argv = [sys.executable, "-m", "engine.cli", "serve", "--gallery", gallery, "--checkpoint", SHIPPED,
            "--port", str(port), *flags]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return server, port
        except OSError:
            if server.poll() is not None:
                raise AssertionError(server.stderr.read()) from None
            time.sleep(0.3)
    server.kill()
    raise AssertionError("the server did not become ready")


def _post(port: int, route: str, body: dict, key: str | None = None) -> tuple:
    headers = {"Content-Type": "application/json", **({"X-API-Key": key} if key else {})}
    request = urllib.request.Request(f"http://127.0.0.1:{port}{route}", data=json.dumps(body).encode(),
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_a_public_address_without_a_key_is_refused_before_loading(demo, capsys):
    started = time.monotonic()
    assert main(["serve", "--gallery", os.path.join(demo, "gallery"), "--checkpoint", SHIPPED,
                 "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--api-key-file" in err and err.count("\n") == 1 and time.monotonic() - started < 5


def test_sigterm_drains_requests_in_flight(demo):
    server, port = _start(os.path.join(demo, "gallery"), "--max-wait-ms", "200")
    try:
        answers = []
        queries = [f"a red circle number {i}" for i in range(12)]  # new prompts: anchors drawn, slow
        body = {"queries": queries, "k": 3}
        worker = threading.Thread(target=lambda: answers.append(_post(port, "/v1/search", body)))
        worker.start()
        time.sleep(0.5)  # queued or running when the signal comes
        server.send_signal(signal.SIGTERM)
        worker.join(120)
        assert answers and answers[0][0] == 200 and len(answers[0][1]["results"]) == 12
        assert server.wait(60) in STOPPED
    finally:
        if server.poll() is None:
            server.kill()


def test_sigterm_during_an_index_job_leaves_the_gallery_whole(demo, tmp_path):
    gallery = os.path.join(demo, "gallery_copy")  # beside the original: its media root is relative
    shutil.copytree(os.path.join(demo, "gallery"), gallery)
    key_file = tmp_path / "key"
    key_file.write_text("k" * 32)
    media = os.path.join(demo, "videos")
    extra = os.path.join(media, "more")
    os.makedirs(extra, exist_ok=True)
    for name in sorted(os.listdir(media))[:6]:
        if name.endswith(".mp4"):
            shutil.copyfile(os.path.join(media, name), os.path.join(extra, "x" + name))  # new paths, same content
            with open(os.path.join(extra, "x" + name), "ab") as handle:
                handle.write(b"\0")  # a changed byte at the end: new content to index
    server, port = _start(gallery, "--api-key-file", str(key_file))
    try:
        status, job = _post(port, "/v1/videos", {"paths": ["more"]}, key="k" * 32)
        assert status == 202, job
        time.sleep(1.0)
        server.send_signal(signal.SIGTERM)
        assert server.wait(120) in STOPPED
    finally:
        if server.poll() is None:
            server.kill()
    assert main(["doctor", gallery]) == 0  # whatever was committed is whole
    assert main(["index", "--checkpoint", SHIPPED, "--videos", media, "--out", gallery, "--quiet"]) in (0, 3)
