"""Video files in and out through PyAV (its wheels bundle FFmpeg): decode sampled frames, encode clips.

No torch here: decoding runs in worker processes that never need it.

`decode_video` picks its frames exactly and the same way every run: a first pass demuxes without
decoding and collects every video packet's presentation time; the frames to keep are chosen from
that sorted list (`fps_indices`, `uniform_indices`, `thin`); a second pass decodes and keeps the
frames whose presentation timestamp was picked. Seeking would be faster on long videos but lands
on keyframes, so the frames it gives depend on the file's GOP layout.

Every way a file can be bad is a `VideoError` with a `.kind` (KINDS) and a one-line message; a
file that is damaged in places (corrupt packets mid-stream, a truncated end) is decoded from the
frames that are there, with a warning.

Frame choice (Sampling, `fps_indices`, `uniform_indices`, `thin`) is engine/video_sampling.py;
encoding (`write_video`) engine/video_encode.py.
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field

import av
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter

from engine.errors import CVRError, InputError
from engine.video_encode import write_video  # noqa: F401 (re-exported: training, bench and tests write clips with it)
from engine.video_sampling import (  # noqa: F401 (Sampling, fps_indices, thin, uniform_indices: re-exported)
    Sampling,
    choose_frames,
    fps_indices,
    is_int,
    thin,
    uniform_indices,
)

KINDS = ("missing", "empty", "unreadable", "not-a-video", "no-video-stream", "unsupported-codec", "too-large",
         "no-frames")
MAX_SIDE = 8192  # wider or taller streams are refused before decoding: one frame would be >200 MB of RGB
THUMBNAIL_SIDE = 160


class VideoError(CVRError):
    """A video file that cannot be decoded; `.kind` (one of KINDS) says which kind of bad file."""

    def __init__(self, path, kind: str, reason: str):
        if kind not in KINDS:
            raise ValueError(f"unknown video error kind {kind!r}")
        super().__init__(f"{path}: {reason}")
        self.path, self.kind, self.reason = str(path), kind, reason

    def __reduce__(self):  # decode workers send it back pickled; the default would call cls(message)
        return (type(self), (self.path, self.kind, self.reason))


# ---------------------------------------------------------------------------------------------
# Decoding


@dataclass
class DecodedVideo:
    frames: np.ndarray  # uint8 (n, size, size, 3) RGB, n >= 1
    timestamps: list  # seconds from the first frame, one per kept frame, ascending
    duration: float  # seconds: last frame time + one frame duration
    fps: float  # the stream's average frame rate
    width: int  # the stored resolution
    height: int
    codec: str
    container: str
    warnings: list = field(default_factory=list)
    thumbnail: bytes = b""  # JPEG, longest side THUMBNAIL_SIDE, aspect kept, of the middle kept frame


@dataclass
class _Timeline:
    """What the first pass (demux only) learnt: the frames in presentation order."""

    keys: list  # each frame's pts (matched against decoded frames' pts), in presentation order
    times: list  # seconds from the first frame, ascending
    frame_duration: float
    by_pts: bool  # every packet had a pts; else decoded frames are matched by their order
    promised: int  # frames the container's header lists (0: it does not say)


def decode_video(path: str, sampling: Sampling, size: int) -> DecodedVideo:
    """The sampled frames of a video file, RGB, resized to size x size by FFmpeg's scaler.
    Raises VideoError (only) for a file that cannot be decoded."""
    path = os.fspath(path)
    sampling.validate()
    if not is_int(size) or size < 1:
        raise InputError(f"frame size must be an integer >= 1, got {size!r}")
    _check_file(path)
    try:
        return _decode(path, sampling, size)
    except VideoError:
        raise
    except FileNotFoundError:  # av.error.FileNotFoundError is one too
        raise VideoError(path, "missing", "no such file (moved or deleted during the run?)") from None
    except PermissionError:
        raise VideoError(path, "unreadable", "permission denied") from None
    except av.error.FFmpegError as error:
        raise VideoError(path, "not-a-video", f"not a video FFmpeg can read ({_reason(error)})") from None
    except OSError as error:
        raise VideoError(path, "unreadable", error.strerror or type(error).__name__) from None
    except UnicodeError:  # PyAV decoding a header string; metadata_errors covers most of them
        raise VideoError(path, "not-a-video", "not a video FFmpeg can read (undecodable header text)") from None


def _check_file(path: str) -> None:
    """The cheap checks, with clearer words than FFmpeg's, before FFmpeg sees the file."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        raise VideoError(path, "missing", "no such file (moved or deleted during the run?)") from None
    except PermissionError:
        raise VideoError(path, "unreadable", "permission denied") from None
    except OSError as error:
        raise VideoError(path, "unreadable", error.strerror or type(error).__name__) from None
    import stat

    if stat.S_ISDIR(status.st_mode):
        raise VideoError(path, "not-a-video", "a folder, not a video file")
    if status.st_size == 0 and stat.S_ISREG(status.st_mode):
        raise VideoError(path, "empty", "empty file (0 bytes)")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise VideoError(path, "unreadable", "permission denied") from None


def _open(path: str):
    try:
        return av.open(path, metadata_errors="replace")
    except av.error.FFmpegError as error:
        if isinstance(error, (FileNotFoundError, PermissionError)):
            raise
        said = _ffmpeg_log(path) or _reason(error)
        raise VideoError(path, "not-a-video", f"not a video FFmpeg can read ({said})") from None


def _decode(path: str, sampling: Sampling, size: int) -> DecodedVideo:
    with _open(path) as container:
        stream = _video_stream(container, path)
        timeline = _timeline(container, stream)
        info = dict(fps=_frame_rate(stream, timeline), width=stream.codec_context.width,
                    height=stream.codec_context.height, codec=stream.codec_context.name,
                    container=container.format.name)
    if not timeline.times:
        raise VideoError(path, "no-frames", "the video stream holds no frames")
    duration = timeline.times[-1] + timeline.frame_duration
    picked = choose_frames(timeline.times, duration, sampling)
    warnings = []
    if timeline.promised > len(timeline.times):
        warnings.append(f"the container lists {timeline.promised} frames, {len(timeline.times)} are in the "
                        "file: truncated?")
    with _open(path) as container:
        kept, thumb, problems = _decode_picked(container, timeline, picked, size)
    if not kept:
        why = f" ({problems[0][1]})" if problems else ""
        raise VideoError(path, "no-frames", f"none of the {len(picked)} sampled frames could be decoded{why}")
    early = [reason for kind, reason in problems if kind == "ends-early"]
    if early:
        warnings.append(f"the file ends early ({early[0]})")
    if len(kept) < len(picked):
        cause = "the decoder gave no picture for them"
        if any(kind == "corrupt" for kind, _ in problems):
            cause = "corrupt data mid-stream"
        elif early:
            cause = "the file ends early"
        warnings.append(f"decoded {len(kept)} of {len(picked)} sampled frames: {cause}")
    order = sorted(kept)
    return DecodedVideo(frames=np.stack([kept[i] for i in order]),
                        timestamps=[round(timeline.times[i], 6) for i in order], duration=round(duration, 6),
                        warnings=warnings, thumbnail=_thumbnail(thumb, info["width"], info["height"]), **info)


def _video_stream(container, path: str):
    """The first video stream, checked: a decoder exists, the size is within MAX_SIDE."""
    stream = _first_video(container)
    if stream is None:
        found = ", ".join(sorted({s.type for s in container.streams})) or "none"
        raise VideoError(path, "no-video-stream", f"no video stream (streams: {found})")
    if stream.codec_context is None:  # PyAV leaves it unset when this FFmpeg has no decoder
        said = _ffmpeg_log(path)
        tag = re.search(r"\((\w[^/()]*?) / 0x[0-9a-fA-F]+\)", said)
        name = repr(tag[1].strip()) if tag else "of this stream"
        raise VideoError(path, "unsupported-codec", f"no decoder for the video codec {name} in this FFmpeg")
    width, height = stream.codec_context.width, stream.codec_context.height
    if width > MAX_SIDE or height > MAX_SIDE:
        raise VideoError(path, "too-large", f"{width}x{height} pixels, over the {MAX_SIDE} px a side this "
                         "engine decodes")
    return stream


def _timeline(container, stream) -> _Timeline:
    """First pass: every packet's presentation time, without decoding (a demuxer error ends it:
    the frames before it are what the file has)."""
    base, rate = stream.time_base, stream.average_rate or stream.guessed_rate
    entries = []  # (seconds, pts, duration in seconds)
    try:
        for packet in container.demux(stream):
            if packet.size == 0 or packet.is_discard:  # the flush packet; frames an edit list cuts
                continue
            stamp = packet.pts if packet.pts is not None else packet.dts
            if stamp is not None and base:
                seconds = float(stamp * base)
            else:
                seconds = len(entries) / float(rate) if rate else float(len(entries))
            entries.append((seconds, packet.pts, float(packet.duration * base) if packet.duration and base else 0.0))
    except av.error.FFmpegError:
        pass  # the second pass meets the same error and reports it
    entries.sort(key=lambda e: e[0])  # stable: ties keep demux order
    start = entries[0][0] if entries else 0.0
    last = entries[-1][2] if entries else 0.0
    return _Timeline(keys=[e[1] for e in entries], times=[e[0] - start for e in entries],
                     frame_duration=last or (1.0 / float(rate) if rate else 0.0),
                     by_pts=all(e[1] is not None for e in entries), promised=max(int(stream.frames or 0), 0))


def _frame_rate(stream, timeline: _Timeline) -> float:
    rate = stream.average_rate or stream.guessed_rate
    if rate:
        return float(rate)
    span = (timeline.times[-1] + timeline.frame_duration) if timeline.times else 0.0
    return len(timeline.times) / span if span > 0 else 0.0


def _decode_picked(container, timeline: _Timeline, picked: list, size: int) -> tuple:
    """Second pass: decode everything (later frames need the earlier ones), convert only the
    picked frames. Returns ({index: rgb}, the VideoFrame for the thumbnail, problems)."""
    stream = _first_video(container)
    wanted = set(picked)
    position = {}
    if timeline.by_pts:
        for index, key in enumerate(timeline.keys):
            position.setdefault(key, index)
    middle = picked[len(picked) // 2]
    kept, thumb, best, problems = {}, None, None, []
    scaler = VideoReformatter()
    for ordinal, frame in enumerate(_decoded_frames(container, stream, problems)):
        index = position.get(frame.pts) if timeline.by_pts else ordinal
        if index not in wanted or index in kept:
            continue
        kept[index] = _to_rgb(frame, size, size, scaler)
        distance = abs(index - middle)
        if best is None or distance < best:  # the middle kept frame, or the nearest one decoded
            thumb, best = frame, distance
        if len(kept) == len(wanted):
            break  # the rest of the file holds no frame we keep
    return kept, thumb, problems


def _first_video(container):
    """The first video stream that is not a cover picture (an mp3's or m4a's album art)."""
    pictures = av.stream.Disposition.attached_pic
    return next((s for s in container.streams.video if not s.disposition & pictures), None)


def _decoded_frames(container, stream, problems: list):
    """Every frame the decoder gives, in presentation order. A packet that fails to decode
    (corrupt data) is skipped and noted in `problems`; a demuxer error ends the stream early,
    after the frames still buffered in the decoder."""
    try:
        for packet in container.demux(stream):
            try:
                yield from packet.decode()
            except av.error.FFmpegError as error:
                problems.append(("corrupt", _reason(error)))
    except av.error.FFmpegError as error:
        problems.append(("ends-early", _reason(error)))
        try:
            yield from stream.codec_context.decode(None)
        except av.error.FFmpegError:
            pass


# FFmpeg's scaler flags. Full chroma interpolation and accurate rounding: without them 4:2:0
# colour is upsampled at half width and rounded coarsely, which cost the built-in clips' features
# up to 0.03 cosine. AREA to shrink (it averages what it drops; bilinear blurs a 2:1 shrink across
# neighbours), bilinear to stretch.
_EXACT = Interpolation.FULL_CHR_H_INT | Interpolation.ACCURATE_RND
CONVERT = Interpolation.BILINEAR | _EXACT  # conversion only (no scaling happens)
SHRINK = Interpolation.AREA | _EXACT
STRETCH = Interpolation.BILINEAR | _EXACT


def _to_rgb(frame, width: int, height: int, scaler) -> np.ndarray:
    """One frame as uint8 RGB (height, width, 3). One scaler for a whole video: frame.to_ndarray
    makes a new scaler context per frame, ~20 times slower than the conversion on small frames.
    The source range (full or limited) is passed on: PyAV's default takes every video as limited."""
    if frame.width == width and frame.height == height:
        flags = CONVERT  # no scaling: the decoder's pixels, only converted to RGB
    else:
        flags = SHRINK if width <= frame.width and height <= frame.height else STRETCH
    rgb = scaler.reformat(frame, width, height, "rgb24", interpolation=flags, src_color_range=frame.color_range,
                          threads=1)  # one thread: decode runs in several worker processes
    return rgb.to_ndarray()


def _thumbnail(frame, width: int, height: int) -> bytes:
    from PIL import Image

    width, height = width or frame.width, height or frame.height
    scale = THUMBNAIL_SIDE / max(width, height)
    rgb = _to_rgb(frame, max(1, round(width * scale)), max(1, round(height * scale)), VideoReformatter())
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _reason(error) -> str:
    """FFmpeg's words for an error, one line."""
    log = getattr(error, "log", None)
    text = log[2] if isinstance(log, tuple) and len(log) > 2 and log[2] else (error.strerror or str(error))
    return " ".join(str(text).split()).rstrip(".")


def _ffmpeg_log(path: str) -> str:
    """What FFmpeg logs while opening `path`, one line (the last message). PyAV keeps FFmpeg's
    log only while a log level is set, and the level is process-wide: so it is set only here, on
    the error path, for a repeated open, and put back."""
    import av.logging

    previous, repeated = av.logging.get_level(), av.logging.get_skip_repeated()
    av.logging.set_level(av.logging.WARNING)
    av.logging.set_skip_repeated(False)  # else a message equal to the last file's is held back
    try:
        with av.logging.Capture() as logs:
            try:
                av.open(path, metadata_errors="replace").close()
            except (av.error.FFmpegError, OSError):
                pass
    finally:
        av.logging.set_level(previous)
        av.logging.set_skip_repeated(repeated)
    lines = [" ".join(message.split()) for _level, _name, message in logs if message.strip()]
    useful = [line for line in lines if "misdetection possible" not in line] or lines
    return useful[-1].rstrip(".") if useful else ""
