"""What a running server holds: the query pipeline (loaded once), the gallery (reloaded when a
writer commits a new manifest), the background index jobs, and the metrics."""
from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass, field

from engine.errors import CVRError

MAX_QUERY_CHARS = 500  # a longer query is refused (400); the text encoders read at most 128 tokens
MAX_QUERIES = 64  # queries per request
MAX_K = 1000
MAX_BODY_BYTES = 64 * 1024
RELOAD_CHECK_S = 0.5  # how often a request may look for a newer manifest


class ServeError(CVRError):
    """A server that cannot start as asked (one line, exit 2)."""


@dataclass
class ServeConfig:
    gallery: str
    checkpoint: str
    backend: str = "torch"
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    read_only: bool = False
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    timeout_s: float = 30.0
    device: str = "cpu"
    export_dir: str | None = None
    anchor_cache: str | None = None
    generator: str | None = None
    steps: int | None = None
    threads: int = 1

    def check(self) -> None:
        """Refusals that need no model: a non-loopback address without an API key, bad limits."""
        if not is_loopback(self.host) and not self.api_key:
            raise ServeError(f"--host {self.host} is reachable from other machines: give --api-key-file to serve "
                             "there (writes and reads then need the key), or bind 127.0.0.1")
        for name in ("max_batch", "max_queue"):
            if getattr(self, name) < 1:
                raise ServeError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_wait_ms < 0 or self.timeout_s <= 0:
            raise ServeError("--max-wait-ms must be >= 0 and --timeout-s > 0")
        if not 0 < self.port < 65536:
            raise ServeError(f"--port must be 1..65535, got {self.port}")


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_key(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            key = handle.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ServeError(f"--api-key-file {path}: cannot read ({getattr(error, 'strerror', None) or error})") from None
    if len(key) < 16:
        raise ServeError(f"--api-key-file {path}: the key must be at least 16 characters")
    return key


class GalleryHolder:
    """The gallery the server searches, swapped for a newer one when its manifest changes (a
    commit of `cvr index` or of a job): requests in flight keep the one they started with."""

    def __init__(self, retriever):
        self.retriever = retriever
        self.folder = retriever.gallery.folder
        self._stamp = self._manifest_stamp()
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def _manifest_stamp(self):
        try:
            status = os.stat(os.path.join(self.folder, "manifest.json"))
            return status.st_ino, status.st_mtime_ns, status.st_size
        except OSError:
            return None

    def current(self, force: bool = False):
        """The Retriever over the newest committed gallery."""
        now = time.monotonic()
        if not force and now - self._checked < RELOAD_CHECK_S:
            return self.retriever
        with self._lock:
            stamp = self._manifest_stamp()
            if stamp is not None and stamp != self._stamp:
                from engine.gallery import Gallery
                from engine.retriever import Retriever

                old = self.retriever
                gallery = Gallery.load(self.folder, checkpoint_id=old.pipeline.checkpoint_id)
                self.retriever = Retriever.from_parts(old.pipeline, gallery, old.backend, old.anchor_cache)
                self._stamp = stamp
            self._checked = now  # only once the newer gallery is in place
        return self.retriever


@dataclass
class Job:
    id: str
    paths: list  # absolute: what the run indexes
    shown: list = field(default_factory=list)  # the same, relative to the media root: what the API shows
    status: str = "queued"  # queued, running, done, failed, abandoned
    created: float = field(default_factory=time.time)
    finished: float | None = None
    error: str | None = None
    report: dict | None = None
    progress: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        report = self.report and {k: v for k, v in self.report.items() if k in ("counts", "videos", "exit_code",
                                                                                 "seconds", "indexed_videos")}
        return {"id": self.id, "status": self.status, "paths": self.shown, "created": self.created,
                "finished": self.finished, "error": self.error, "report": report, "progress": self.progress}


class Jobs:
    """Background `cvr index --videos` runs, one at a time, in a thread; stopping lets the run
    finish its batch in flight and commit, and marks the rest abandoned (nothing half-written:
    every commit is a part plus an atomically replaced manifest)."""

    def __init__(self, config: ServeConfig, on_commit):
        self.config, self.on_commit = config, on_commit
        self.jobs: dict = {}
        self.stopping = threading.Event()
        self._queue: list = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, paths: list, shown: list | None = None) -> Job:
        job = Job(uuid.uuid4().hex[:12], paths, shown or [])
        with self._lock:
            self.jobs[job.id] = job
            self._queue.append(job)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="cvr-index-jobs", daemon=True)
                self._thread.start()
        return job

    def _work(self) -> None:
        while not self.stopping.is_set():
            with self._lock:
                if not self._queue:
                    self._thread = None
                    return
                job = self._queue.pop(0)
            self._run(job)
        with self._lock:
            for job in self._queue:
                job.status, job.finished = "abandoned", time.time()
            self._queue.clear()
            self._thread = None

    def _run(self, job: Job) -> None:
        from engine.ingest import index_videos
        from engine.ingest_options import IngestOptions

        job.status = "running"
        options = IngestOptions(progress=False, workers=0, should_stop=self.stopping.is_set,
                                on_progress=lambda done, total: job.progress.update(done=done, total=total))
        status, error_text, report = "failed", None, None
        try:
            report = index_videos(self.config.checkpoint, job.paths, self.config.gallery, options)
            status = "abandoned" if report.stopped else "done"
        except CVRError as error:
            error_text = str(error).splitlines()[0]
        except OSError as error:
            error_text = f"{error.filename or ''}: {error.strerror or error}".strip(": ")
        finally:
            self.on_commit()  # the server serves the new gallery before the job says it is done
            job.report = report and report.to_dict()
            job.error, job.finished, job.status = error_text, time.time(), status

    def stop(self, timeout: float = 60.0) -> None:
        self.stopping.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
