"""Clips out: write_video encodes uint8 RGB frames through PyAV, with its own BT.601 4:2:0 colour conversion."""
from __future__ import annotations

import math
import os
from fractions import Fraction

import av
import numpy as np

from engine.errors import InputError
from engine.video_sampling import is_int, is_number

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
    if not is_int(upscale) or upscale < 1:
        raise InputError(f"upscale must be an integer >= 1, got {upscale!r}")
    if not is_number(fps) or not math.isfinite(fps) or fps <= 0:
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
