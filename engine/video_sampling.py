"""Which frames to keep: Sampling (a frame rate or N frames, capped) and the exact choice over presentation times."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from engine.errors import InputError

_EPS = 1e-6  # seconds: pts * time_base is exact, i / fps is a float; a frame at 0.9999999 s counts for t = 1


@dataclass(frozen=True)
class Sampling:
    fps: float | None = 1.0  # frames per second of video time (default 1, as the MSR-VTT features)
    frames: int | None = None  # or N frames uniformly over the video (then fps is ignored)
    max_frames: int = 64  # cap: more sampled frames are thinned uniformly to this many

    def validate(self) -> None:
        if self.frames is not None:
            if not is_int(self.frames) or self.frames < 1:
                raise InputError(f"frames per video must be an integer >= 1, got {self.frames!r}")
        elif self.fps is None:
            raise InputError("sampling needs a frame rate (fps) or a number of frames")
        elif not is_number(self.fps) or not math.isfinite(self.fps) or self.fps <= 0:
            raise InputError(f"sampling fps must be a number > 0, got {self.fps!r}")
        if not is_int(self.max_frames) or self.max_frames < 1:
            raise InputError(f"max frames per video must be an integer >= 1, got {self.max_frames!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Sampling:
        if not isinstance(d, dict):
            raise InputError(f"sampling must be an object, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise InputError(f"sampling has unknown field(s) {', '.join(unknown)}")
        sampling = cls(**d)
        sampling.validate()
        return sampling

    def describe(self) -> str:
        if self.frames is not None:
            return f"{min(self.frames, self.max_frames)} frames uniformly"
        return f"{self.fps:g} fps, at most {self.max_frames} frames"


def is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def uniform_indices(n: int, count: int) -> list:
    """`count` indices spread uniformly over n frames: floor((i + 0.5) * n / count), once each
    (count >= n keeps every frame)."""
    picked = [((2 * i + 1) * n) // (2 * count) for i in range(count)] if n > 0 else []
    return sorted(set(picked))


def fps_indices(times: list, fps: float, duration: float) -> list:
    """For each target time i / fps below `duration`, the first frame whose time is >= it, once
    each. `times`: ascending seconds. Jumps straight to the next target past the frame just
    picked, so a high fps over a long video costs one step per kept frame."""
    picked, j, i = [], 0, 0
    while i / fps < duration - _EPS:
        target = i / fps
        while j < len(times) and times[j] < target - _EPS:
            j += 1
        if j == len(times):
            break
        picked.append(j)
        i = max(i + 1, math.floor((times[j] + _EPS) * fps) + 1)
    return picked


def thin(picked: list, limit: int) -> list:
    """At most `limit` of the picked indices, spread uniformly over them."""
    if len(picked) <= limit:
        return list(picked)
    return [picked[k] for k in uniform_indices(len(picked), limit)]


def choose_frames(times: list, duration: float, sampling: Sampling) -> list:
    """Indices into the presentation-ordered `times` of the frames to keep."""
    if sampling.frames is not None:
        return uniform_indices(len(times), min(sampling.frames, sampling.max_frames))
    return thin(fps_indices(times, sampling.fps, duration), sampling.max_frames)
