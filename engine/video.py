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
"""
from __future__ import annotations

import io
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction

import av
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter

from engine.errors import CVRError, InputError

KINDS = ("missing", "empty", "unreadable", "not-a-video", "no-video-stream", "unsupported-codec", "too-large",
         "no-frames")
MAX_SIDE = 8192  # wider or taller streams are refused before decoding: one frame would be >200 MB of RGB
THUMBNAIL_SIDE = 160
_EPS = 1e-6  # seconds: pts * time_base is exact, i / fps is a float; a frame at 0.9999999 s counts for t = 1


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
# Which frames to keep


@dataclass(frozen=True)
class Sampling:
    fps: float | None = 1.0  # frames per second of video time (default 1, as the MSR-VTT features)
    frames: int | None = None  # or N frames uniformly over the video (then fps is ignored)
    max_frames: int = 64  # cap: more sampled frames are thinned uniformly to this many

    def validate(self) -> None:
        if self.frames is not None:
            if not _is_int(self.frames) or self.frames < 1:
                raise InputError(f"frames per video must be an integer >= 1, got {self.frames!r}")
        elif self.fps is None:
            raise InputError("sampling needs a frame rate (fps) or a number of frames")
        elif not _is_number(self.fps) or not math.isfinite(self.fps) or self.fps <= 0:
            raise InputError(f"sampling fps must be a number > 0, got {self.fps!r}")
        if not _is_int(self.max_frames) or self.max_frames < 1:
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


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
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
    if not _is_int(size) or size < 1:
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


# ---------------------------------------------------------------------------------------------
# Encoding

_PIXEL_FORMATS = {"gif": "rgb8", "png": "rgb24", "mjpeg": "yuvj420p", "ffv1": "yuv444p", "libx264rgb": "rgb24"}
_CRF_CODECS = ("libx264", "libx264rgb", "libx265", "libvpx-vp9", "libvpx")
# BT.601, limited range: what FFmpeg assumes for an untagged stream, and tagged so players agree.
_BT601 = {"colorspace": 6, "color_primaries": 6, "color_trc": 6, "color_range": 1}  # AVCOL_*_SMPTE170M, MPEG


def write_video(path: str, frames: np.ndarray, fps: float, codec: str = "libx264", crf: int = 18, *,
                upscale: int = 1, threads: int = 0) -> None:
    """Encode uint8 (n, H, W, 3) RGB frames to `path` (the container from its suffix) atomically.

    4:2:0 codecs (H.264, VP9, mpeg4) need an even width and height; their colour is converted here
    (BT.601, each 2x2 block's chroma averaged) rather than by FFmpeg's scaler, which filters
    chroma across blocks. `upscale=2` stores each pixel as a 2x2 block, so 4:2:0 keeps every
    source pixel's colour (decode shrinks it back). `threads=1` makes the bytes the same on every
    machine (x264's output depends on its thread count; 0 lets FFmpeg choose). mp4/mov files get
    their index at the front (movflags=faststart), so a browser can play them while they load."""
    frames = _check_frames(frames)
    if not _is_int(upscale) or upscale < 1:
        raise InputError(f"upscale must be an integer >= 1, got {upscale!r}")
    if not _is_number(fps) or not math.isfinite(fps) or fps <= 0:
        raise InputError(f"fps must be a number > 0, got {fps!r}")
    pix_fmt = _PIXEL_FORMATS.get(codec, "yuv420p")
    height, width = frames.shape[1] * upscale, frames.shape[2] * upscale
    if pix_fmt.startswith(("yuv420", "yuvj420")) and (width % 2 or height % 2):
        raise InputError(f"{codec} with {pix_fmt} needs an even width and height, got {width}x{height}")
    from engine import files

    suffix = os.path.splitext(str(path))[1].lower()
    options = {"movflags": "+faststart"} if suffix in (".mp4", ".mov", ".m4v") else {}
    with files.atomic_path(path) as temporary:
        with av.open(temporary, "w", options=options) as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
            stream.options = _codec_options(codec, crf, threads)
            if codec.startswith("libvpx"):
                stream.bit_rate = 0  # VP9's constant-quality mode: crf with no bitrate target
            if pix_fmt == "yuv420p":
                for key, value in _BT601.items():
                    setattr(stream.codec_context, key, value)
            for image in frames:
                container.mux(stream.encode(_to_frame(image, upscale, pix_fmt)))
            container.mux(stream.encode())


def _codec_options(codec: str, crf: int, threads: int) -> dict:
    options = {"crf": str(int(crf))} if codec in _CRF_CODECS else {}
    if threads:
        options["threads"] = str(int(threads))
    return options


def _to_frame(image: np.ndarray, upscale: int, pix_fmt: str):
    if upscale > 1:
        image = image.repeat(upscale, axis=0).repeat(upscale, axis=1)
    if pix_fmt != "yuv420p":
        return av.VideoFrame.from_ndarray(image, format="rgb24")  # the encoder's own conversion
    return av.VideoFrame.from_ndarray(rgb_to_yuv420p(image), format="yuv420p")


def rgb_to_yuv420p(image: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3), H and W even -> yuv420p planes stacked as (H * 3 / 2, W): BT.601
    limited range, each chroma sample the mean of its 2x2 block."""
    rgb = image.astype(np.float32) / np.float32(255.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16.0 + 65.481 * r + 128.553 * g + 24.966 * b
    u = 128.0 - 37.797 * r - 74.203 * g + 112.0 * b
    v = 128.0 + 112.0 * r - 93.786 * g - 18.214 * b
    height, width = y.shape

    def block_mean(plane):
        return plane.reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))

    planes = [y.reshape(-1), block_mean(u).reshape(-1), block_mean(v).reshape(-1)]
    stacked = np.concatenate(planes).reshape(height * 3 // 2, width)
    return np.clip(np.rint(stacked), 0, 255).astype(np.uint8)


def _check_frames(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) < 1:
        raise InputError(f"frames must be uint8 (n, height, width, 3) with n >= 1, got {frames.dtype} "
                         f"{tuple(frames.shape)}")
    return np.ascontiguousarray(frames)
