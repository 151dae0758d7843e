"""What an indexing run is told and what it reports: IngestOptions, IngestReport and IngestError."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.errors import CVRError
from engine.video_embed import StageTimes
from engine.video_sampling import Sampling

BATCH_VIDEOS = 16  # videos per committed part: what a kill can lose, and the tower's batch


class IngestError(CVRError):
    """A run that cannot start or cannot index anything (one-line message, exit code 2)."""


@dataclass
class IngestOptions:
    """How `cvr index --videos` runs. None means: the gallery's own (a re-run keeps what it was
    indexed with), or the default for a new gallery."""

    sampling: Sampling | None = None
    segments: str | None = None  # WINDOW:STRIDE or none; default DEFAULT_SEGMENTS
    media_root: str | None = None
    metadata: str | None = None
    prune: bool = False
    faiss: str | None = None
    dtype: str | None = None
    device: str = "cpu"
    workers: int = 1
    batch_videos: int = BATCH_VIDEOS
    vision_weights: str | None = None
    list_file: str | None = None
    progress: bool = True
    overwrite: bool = False
    ray: str | None = None  # run decoding and embedding as a Ray Data job: "local", "auto" or an address
    should_stop: object = None  # a callable: True asks the run to stop after the batch in flight
    on_progress: object = None  # a callable (videos decoded, videos to decode)


@dataclass
class IngestReport:
    gallery: str
    counts: dict = field(default_factory=lambda: dict.fromkeys(("new", "changed", "unchanged", "removed",
                                                                  "skipped"), 0))
    skipped: list = field(default_factory=list)  # Skipped
    warnings: list = field(default_factory=list)  # (path, warning)
    times: StageTimes = field(default_factory=StageTimes)
    videos: int = 0  # live videos after the run
    stopped: bool = False  # asked to stop: what was committed stays, the rest waits for the next run

    def summary(self) -> str:
        return ", ".join(f"{n} {name}" for name, n in self.counts.items())

    @property
    def exit_code(self) -> int:
        """0: every file indexed or up to date; 3: some skipped; 2: nothing could be indexed."""
        if self.videos == 0:
            return 2
        return 3 if self.counts["skipped"] else 0

    def to_dict(self) -> dict:
        return {"format": "cvr-sdgm/index-report/1", "gallery": self.gallery, "counts": self.counts,
                "videos": self.videos, "exit_code": self.exit_code,
                "skipped": [vars(s) for s in self.skipped],
                "warnings": [{"path": p, "warning": w} for p, w in self.warnings],
                "seconds": {"wall": self.times.wall, "decode": self.times.decode, "resnet": self.times.resnet,
                            "tower": self.times.tower, "write": self.times.write},
                "indexed_videos": self.times.videos,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
