"""Makers of small test video files, good and bad, written with PyAV (not a test module).

Every maker is `maker(folder) -> path` and writes a new file in `folder`; they are tiny (64x64,
a few frames) so a test module can build all of them in well under a second. The good ones show
`pattern(n, width, height)`, so a test can compare what it decodes with what was encoded.
`as_unprivileged` runs a function as an ordinary user, for the file that must be unreadable.
"""
from __future__ import annotations

import os
import pickle
import pwd
from fractions import Fraction

import av
import numpy as np

SIDE = 64
FRAMES = 8
FPS = 4
# Background colours that survive 4:2:0 chroma subsampling and GIF's 3-3-2 palette well: large
# flat areas of saturated, well separated colours.
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255), (255, 255, 255),
           (0, 0, 0)]


def pattern(n: int = FRAMES, width: int = SIDE, height: int = SIDE) -> np.ndarray:
    """uint8 (n, height, width, 3): frame i is a flat colour with a black-or-white square at a
    place that moves with i, so frames differ from each other and their order shows."""
    frames = np.empty((n, height, width, 3), np.uint8)
    block = max(2, min(width, height) // 4)
    for i in range(n):
        colour = np.array(COLOURS[i % len(COLOURS)], np.uint8)
        frames[i] = colour
        x = (i * block // 2) % max(1, width - block)
        y = (i * block // 3) % max(1, height - block)
        frames[i, y : y + block, x : x + block] = 0 if colour.mean() > 127 else 255
    return frames


def encode(path, frames, codec: str, fps=FPS, pix_fmt: str = "yuv420p", options=None, container_options=None,
           first_pts: int = 0, rate=None) -> str:
    """Write `frames` with PyAV directly (not through engine.video.write_video, which is under test).
    `first_pts` shifts every frame's pts, in units of 1/fps: a video that does not start at 0."""
    rate = Fraction(rate or fps).limit_denominator(1001)
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        stream.options = options or {}
        if first_pts:
            stream.codec_context.time_base = Fraction(1) / rate
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if first_pts:
                frame.pts, frame.time_base = first_pts + i, Fraction(1) / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return str(path)


# ---------------------------------------------------------------------------------------------
# Good files: (maker, container name, codec name) for the parametrised tests

def mp4_h264(folder) -> str:
    return encode(os.path.join(folder, "h264.mp4"), pattern(), "libx264", options={"crf": "4"})


def webm_vp9(folder) -> str:
    return encode(os.path.join(folder, "vp9.webm"), pattern(), "libvpx-vp9", options={"crf": "4", "b": "0"})


def mkv_h264(folder) -> str:
    return encode(os.path.join(folder, "h264.mkv"), pattern(), "libx264", options={"crf": "4"})


def mov_h264(folder) -> str:
    return encode(os.path.join(folder, "h264.mov"), pattern(), "libx264", options={"crf": "4"})


def avi_mpeg4(folder) -> str:
    return encode(os.path.join(folder, "mpeg4.avi"), pattern(), "mpeg4", options={"qscale": "2"})


def gif(folder) -> str:
    """An animated GIF (8 frames, a different colour each)."""
    return encode(os.path.join(folder, "anim.gif"), pattern(), "gif", pix_fmt="rgb8")


def one_frame_mp4(folder) -> str:
    return encode(os.path.join(folder, "one.mp4"), pattern(1), "libx264", options={"crf": "4"})


def one_frame_gif(folder) -> str:
    """A still: a GIF of one frame."""
    return encode(os.path.join(folder, "still.gif"), pattern(1), "gif", pix_fmt="rgb8")


def late_start_mkv(folder) -> str:
    """Frames whose pts start at 10 s (a cut from a longer recording), 4 fps."""
    return encode(os.path.join(folder, "late.mkv"), pattern(), "libx264", options={"crf": "4"}, first_pts=40)


def wide_mp4(folder) -> str:
    """96x48: not square, so frames are resized and the thumbnail keeps a 2:1 aspect."""
    return encode(os.path.join(folder, "wide.mp4"), pattern(4, 96, 48), "libx264", options={"crf": "4"})


GOOD = {  # maker -> (container as FFmpeg names it, codec)
    mp4_h264: ("mov,mp4,m4a,3gp,3g2,mj2", "h264"),
    webm_vp9: ("matroska,webm", "vp9"),
    mkv_h264: ("matroska,webm", "h264"),
    mov_h264: ("mov,mp4,m4a,3gp,3g2,mj2", "h264"),
    avi_mpeg4: ("avi", "mpeg4"),
    gif: ("gif", "gif"),
}


# ---------------------------------------------------------------------------------------------
# Bad files


def zero_bytes(folder) -> str:
    path = os.path.join(folder, "zero.mp4")
    open(path, "wb").close()
    return path


def text_as_mp4(folder) -> str:
    """A text file with a video's name: FFmpeg's mp4 probe says "moov atom not found"."""
    path = os.path.join(folder, "notes.mp4")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("this is a text file, not a video\n" * 4)
    return path


def noisy_mp4(folder, name: str = "noisy.mp4", n: int = 16, faststart: bool = True) -> str:
    """16 frames of noise at 64x64, a keyframe every 4: big packets, so a cut or a run of garbage
    lands inside frame data. faststart puts the index (moov) before the frames."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (n, SIDE, SIDE, 3), dtype=np.uint8)
    return encode(os.path.join(folder, name), frames, "libx264", options={"crf": "30", "g": "4"},
                  container_options={"movflags": "+faststart"} if faststart else None)


def truncated_mp4(folder) -> str:
    """A 16-frame mp4 cut at 60% of its bytes; the index at the front survives and still lists 16
    frames, the last packets are missing or cut short."""
    path = noisy_mp4(folder, "truncated.mp4")
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[: int(len(data) * 0.6)])
    return path


def truncated_mp4_index_at_end(folder) -> str:
    """Cut at 60% with the index (moov) at the end, so it is lost: FFmpeg says "moov atom not found"."""
    path = noisy_mp4(folder, "truncated_end.mp4", faststart=False)
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[: int(len(data) * 0.6)])
    return path


def corrupt_mp4(folder) -> str:
    """A 16-frame mp4 with 32 bytes of garbage over the start of frames 5 and 10's data (in the
    mdat, the index untouched): the NAL unit sizes there are garbage, so the decoder refuses those
    two packets (avcodec_send_packet: invalid data) and decodes the others."""
    path = noisy_mp4(folder, "corrupt.mp4")
    with av.open(path) as container:
        where = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
    with open(path, "r+b") as handle:
        for index in (5, 10):
            handle.seek(where[index][0])
            handle.write(bytes(np.random.default_rng(index).integers(0, 256, 32, dtype=np.uint8)))
    return path


def audio_m4a(folder) -> str:
    """AAC audio only, in an m4a."""
    return _audio(os.path.join(folder, "sound.m4a"), "aac", "fltp", np.float32)


def audio_wav(folder) -> str:
    """PCM audio only, in a wav."""
    return _audio(os.path.join(folder, "sound.wav"), "pcm_s16le", "s16", np.int16)


def _audio(path: str, codec: str, sample_format: str, dtype) -> str:
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=8000)
        stream.layout = "mono"
        samples = (np.sin(np.arange(4096) / 10) * (0.5 if dtype == np.float32 else 8000)).astype(dtype)
        frame = av.AudioFrame.from_ndarray(samples[None, :], format=sample_format, layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def unknown_codec_avi(folder) -> str:
    """An mpeg4 AVI whose fourcc (in the stream header and the bitmap header) is patched to
    "XXXX": FFmpeg finds no decoder ("Could not find codec parameters ... none (XXXX /
    0x58585858) ... unknown codec")."""
    path = encode(os.path.join(folder, "unknown.avi"), pattern(4), "mpeg4")
    with open(path, "rb") as handle:
        data = handle.read()
    assert data.count(b"FMP4") == 2, "the AVI header layout changed"
    with open(path, "wb") as handle:
        handle.write(data.replace(b"FMP4", b"XXXX"))
    return path


def too_large_avi(folder) -> str:
    """One MJPEG frame of 8200x16 (over MAX_SIDE wide): 7 KB, encodes in ~20 ms."""
    frame = np.zeros((1, 16, 8200, 3), np.uint8)
    return encode(os.path.join(folder, "wide.avi"), frame, "mjpeg", fps=1, pix_fmt="yuvj420p")


def unreadable_mp4(folder) -> str:
    """A good mp4 with mode 000. Root reads it anyway: test it through `as_unprivileged`, in a
    folder that user can enter (pytest's tmp_path base is owner-only)."""
    path = encode(os.path.join(folder, "secret.mp4"), pattern(2), "libx264")
    os.chmod(path, 0)
    return path


def others_can_enter(path) -> bool:
    """Whether a user who is neither the owner nor in the group can reach and list `path`: every
    folder from / down to it has the others' execute bit, and `path` itself the others' read bit.
    `as_unprivileged` runs code as `nobody`, which then imports and reads from the checkout."""
    import stat
    from pathlib import Path

    path = Path(path).resolve()
    folders = [path, *path.parents]
    return bool(path.stat().st_mode & stat.S_IROTH) and all(f.stat().st_mode & stat.S_IXOTH for f in folders)


def as_unprivileged(fn, *args):
    """fn(*args) as the `nobody` user when this process is root (forked: setgid/setuid in the
    child, the result or the exception pickled back through a pipe); else simply fn(*args)."""
    if os.geteuid() != 0:
        return fn(*args)
    nobody = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test runner
        os.close(read_end)
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            outcome = ("returned", fn(*args))
        except BaseException as error:  # noqa: BLE001 - everything goes back to the parent
            outcome = ("raised", error)
        try:
            payload = pickle.dumps(outcome)
        except Exception:  # noqa: BLE001 - an unpicklable result: send its text
            payload = pickle.dumps(("raised", RuntimeError(repr(outcome[1]))))
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(payload)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        payload = pipe.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(payload)
    if kind == "raised":
        raise value
    return value


BAD = {  # maker -> the VideoError kind decode_video gives
    zero_bytes: "empty",
    text_as_mp4: "not-a-video",
    truncated_mp4_index_at_end: "not-a-video",
    audio_m4a: "no-video-stream",
    audio_wav: "no-video-stream",
    unknown_codec_avi: "unsupported-codec",
    too_large_avi: "too-large",
}
