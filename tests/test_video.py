"""engine/video.py: decoding each container and codec, every kind of bad file, exact frame choice,
thumbnails, and the writer. The files are tiny and built once for the module (tests/videofiles.py)."""
import io
import math
import os
import pickle
import shutil
import tempfile

import av
import numpy as np
import pytest
import videofiles as vf
from PIL import Image

from engine import video
from engine.errors import InputError
from engine.video import Sampling, VideoError, decode_video

ALL = Sampling(frames=1000, max_frames=1000)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="module")
def made(folder):
    """maker -> path, every maker run once."""
    makers = [*vf.GOOD, *vf.BAD, vf.one_frame_mp4, vf.one_frame_gif, vf.late_start_mkv, vf.wide_mp4,
              vf.truncated_mp4, vf.corrupt_mp4]
    return {maker: maker(folder) for maker in makers}


def _mean_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ---------------------------------------------------------------------------------------------
# Good files


@pytest.mark.parametrize("maker", list(vf.GOOD), ids=lambda m: m.__name__)
def test_each_container_and_codec_decodes(made, maker):
    container, codec = vf.GOOD[maker]
    decoded = decode_video(made[maker], ALL, size=vf.SIDE)
    assert decoded.frames.shape == (vf.FRAMES, vf.SIDE, vf.SIDE, 3) and decoded.frames.dtype == np.uint8
    assert decoded.timestamps == [i / vf.FPS for i in range(vf.FRAMES)]
    assert decoded.duration == pytest.approx(vf.FRAMES / vf.FPS) and decoded.fps == pytest.approx(vf.FPS)
    assert (decoded.width, decoded.height, decoded.codec, decoded.container) == (vf.SIDE, vf.SIDE, codec, container)
    assert decoded.warnings == []
    error = _mean_error(decoded.frames, vf.pattern())
    assert error < 3.0, f"{maker.__name__}: mean abs error {error:.2f} against the encoded pixels"
    smaller = decode_video(made[maker], Sampling(), size=32)  # 1 fps over 2 s: the frames at 0 s and 1 s
    assert smaller.frames.shape == (2, 32, 32, 3) and smaller.timestamps == [0.0, 1.0]


@pytest.mark.parametrize("maker, flags", [(vf.mp4_h264, video.CONVERT), (vf.gif, None)], ids=["h264", "gif"])
def test_no_resize_gives_the_decoders_pixels(made, maker, flags):
    """At the stored size nothing is scaled: the decoder's frames, converted to RGB (a GIF's
    palette colours exactly; H.264's 4:2:0 with full chroma interpolation)."""
    with av.open(made[maker]) as container:
        direct = np.stack([f.to_ndarray(format="rgb24", interpolation=flags) for f in container.decode(video=0)])
    assert np.array_equal(decode_video(made[maker], ALL, size=vf.SIDE).frames, direct)


@pytest.mark.parametrize("maker", [vf.one_frame_mp4, vf.one_frame_gif], ids=lambda m: m.__name__)
def test_one_frame_video_is_a_video(made, maker):
    for sampling in (Sampling(), Sampling(frames=8)):
        decoded = decode_video(made[maker], sampling, size=16)
        assert decoded.frames.shape == (1, 16, 16, 3) and decoded.timestamps == [0.0]
        assert decoded.duration == pytest.approx(1 / vf.FPS) and decoded.warnings == []


def test_a_video_that_starts_late_is_timed_from_its_first_frame(made):
    path = made[vf.late_start_mkv]
    with av.open(path) as container:  # the file really starts at 10 s, with B-frames reordered
        pts = [p.pts for p in container.demux(video=0) if p.size]
    assert min(pts) == 10000 and pts != sorted(pts)
    decoded = decode_video(path, ALL, size=vf.SIDE)
    assert decoded.timestamps == [i / vf.FPS for i in range(vf.FRAMES)] and decoded.duration == pytest.approx(2.0)
    for frame, source in zip(decoded.frames, vf.pattern(), strict=True):  # in presentation order
        assert _mean_error(frame, source) < 3.0


def test_thumbnail_is_a_jpeg_of_the_middle_frame_with_the_aspect_kept(made):
    decoded = decode_video(made[vf.mp4_h264], Sampling(frames=8), size=32)
    image = Image.open(io.BytesIO(decoded.thumbnail))
    assert image.format == "JPEG" and image.size == (video.THUMBNAIL_SIDE, video.THUMBNAIL_SIDE)
    corner = np.asarray(image.convert("RGB"))[-20:, -20:].reshape(-1, 3).mean(axis=0)
    assert np.abs(corner - vf.COLOURS[4]).max() < 20  # frame 4 of 8 kept, magenta
    wide = decode_video(made[vf.wide_mp4], Sampling(), size=vf.SIDE)
    assert (wide.width, wide.height) == (96, 48) and wide.frames.shape == (1, vf.SIDE, vf.SIDE, 3)
    assert Image.open(io.BytesIO(wide.thumbnail)).size == (160, 80)


# ---------------------------------------------------------------------------------------------
# Bad files


def _error(path, **kwargs) -> VideoError:
    with pytest.raises(VideoError) as caught:
        decode_video(path, Sampling(**kwargs), size=32)
    return caught.value


@pytest.mark.parametrize("maker", list(vf.BAD), ids=lambda m: m.__name__)
def test_each_bad_file_is_one_line_of_its_kind(made, maker):
    error = _error(made[maker])
    assert error.kind == vf.BAD[maker] and error.kind in video.KINDS
    assert str(error).startswith(made[maker] + ": ") and "\n" not in str(error)
    said = {vf.text_as_mp4: "moov atom not found", vf.truncated_mp4_index_at_end: "moov atom not found",
            vf.unknown_codec_avi: "'XXXX'", vf.too_large_avi: "8200x16", vf.audio_m4a: "streams: audio",
            vf.zero_bytes: "0 bytes"}.get(maker)
    assert said is None or said in str(error), str(error)


def test_missing_file_and_a_file_that_vanishes_before_ffmpeg_opens_it(folder, monkeypatch):
    error = _error(os.path.join(folder, "gone.mp4"))
    assert error.kind == "missing" and "moved or deleted" in str(error)
    path = vf.mp4_h264(tempfile.mkdtemp(dir=folder))
    os.unlink(path)
    monkeypatch.setattr(video, "_check_file", lambda path: None)  # as if it went between the checks
    assert _error(path).kind == "missing"


def test_a_folder_is_not_a_video(folder):
    assert _error(folder).kind == "not-a-video"


def _kind_of(path) -> tuple:
    try:
        decode_video(path, Sampling(), size=32)
    except VideoError as error:
        return error.kind, str(error)
    return None, ""


def test_unreadable_file():
    # pytest's temporary base folder is owner-only: `nobody` could not even reach the file.
    folder = tempfile.mkdtemp(prefix="cvr-video-")
    try:
        os.chmod(folder, 0o755)
        path = vf.unreadable_mp4(folder)
        kind, message = vf.as_unprivileged(_kind_of, path)
        assert kind == "unreadable" and message == f"{path}: permission denied"
    finally:
        shutil.rmtree(folder)


def test_as_unprivileged_returns_and_raises_through_the_pipe():
    assert vf.as_unprivileged(os.geteuid) != 0
    with pytest.raises(VideoError) as caught:
        vf.as_unprivileged(decode_video, "/nonexistent/x.mp4", Sampling(), 32)
    assert caught.value.kind == "missing"


def test_truncated_file_is_indexed_from_the_frames_that_are_there(made):
    decoded = decode_video(made[vf.truncated_mp4], ALL, size=32)
    assert len(decoded.frames) == 9 and decoded.timestamps == [i / 4 for i in range(9)]
    assert decoded.warnings == ["the container lists 16 frames, 10 are in the file: truncated?",
                                "decoded 9 of 10 sampled frames: corrupt data mid-stream"]


def test_corrupt_data_mid_stream_decodes_the_rest_with_a_warning(made):
    decoded = decode_video(made[vf.corrupt_mp4], Sampling(frames=16), size=32)
    assert decoded.timestamps == [i / 4 for i in range(16) if i not in (5, 10)]
    assert decoded.warnings == ["decoded 14 of 16 sampled frames: corrupt data mid-stream"]
    assert decode_video(made[vf.corrupt_mp4], Sampling(fps=1), size=32).warnings == []  # 0, 1, 2, 3 s are fine


def test_video_error_survives_pickling_and_knows_its_kinds():
    error = VideoError("/x.mp4", "too-large", "9000x10 pixels")
    again = pickle.loads(pickle.dumps(error))
    assert (type(again), again.kind, str(again), again.path) == (VideoError, "too-large", "/x.mp4: 9000x10 pixels",
                                                                 "/x.mp4")
    with pytest.raises(ValueError):
        VideoError("/x.mp4", "bad-kind", "?")


# ---------------------------------------------------------------------------------------------
# Sampling and the choice of frames


@pytest.mark.parametrize("kwargs, word", [
    ({"fps": 0}, "fps"), ({"fps": -1.0}, "fps"), ({"fps": math.nan}, "fps"), ({"fps": math.inf}, "fps"),
    ({"fps": "1"}, "fps"), ({"fps": None}, "fps"), ({"frames": 0}, "frames"), ({"frames": 2.5}, "frames"),
    ({"frames": True}, "frames"), ({"max_frames": 0}, "max frames"), ({"max_frames": 3.0}, "max frames"),
])
def test_sampling_refuses_bad_values_in_one_line(kwargs, word):
    with pytest.raises(InputError) as caught:
        Sampling(**kwargs).validate()
    assert word in str(caught.value) and "\n" not in str(caught.value)


def test_sampling_round_trips_and_describes_itself():
    for sampling in (Sampling(), Sampling(fps=0.5, max_frames=10), Sampling(frames=8)):
        assert Sampling.from_dict(sampling.to_dict()) == sampling
    assert Sampling().describe() == "1 fps, at most 64 frames"
    assert Sampling(fps=2.5, max_frames=8).describe() == "2.5 fps, at most 8 frames"
    assert Sampling(frames=8).describe() == "8 frames uniformly"
    with pytest.raises(InputError):
        Sampling.from_dict({"fps": 1, "stride": 2})
    with pytest.raises(InputError):
        Sampling.from_dict({"fps": -1})
    with pytest.raises(InputError):
        decode_video("/x.mp4", Sampling(fps=0), size=32)  # checked before the file


def test_uniform_indices():
    assert video.uniform_indices(8, 8) == list(range(8))
    assert video.uniform_indices(10, 3) == [1, 5, 8]
    assert video.uniform_indices(3, 8) == [0, 1, 2]  # fewer frames than asked: each once
    assert video.uniform_indices(1, 5) == [0] and video.uniform_indices(0, 4) == []
    assert video.uniform_indices(100, 1) == [50]


def test_fps_indices():
    thirty = [i / 30 for i in range(300)]
    assert video.fps_indices(thirty, 1.0, 10.0) == list(range(0, 300, 30))
    assert video.fps_indices([0.0, 0.5, 1.0, 1.5], 10.0, 2.0) == [0, 1, 2, 3]  # faster than the video: each once
    assert video.fps_indices([0.0, 0.1, 2.5, 2.6], 1.0, 2.7) == [0, 2]  # a gap: the first frame after 1 s
    ntsc = [i * 1001 / 30000 for i in range(90)]
    assert video.fps_indices(ntsc, 1.0, 90 * 1001 / 30000) == [0, 30, 60]
    assert video.fps_indices([0.0, 0.99999995, 2.0], 1.0, 3.0) == [0, 1, 2]  # float slack at the target
    assert video.fps_indices([0.0, 3599.0], 1000.0, 3600.0) == [0, 1]  # 3.6 million targets, two steps
    assert video.fps_indices([0.0], 1.0, 0.04) == [0]


def test_choose_frames_thins_to_max_frames():
    times = [i / 30 for i in range(300)]
    thinned = video.choose_frames(times, 10.0, Sampling(fps=30.0))
    assert len(thinned) == 64 and thinned == sorted(set(thinned)) and thinned[0] == 2
    assert video.choose_frames(times, 10.0, Sampling(frames=100, max_frames=8)) == video.uniform_indices(300, 8)
    assert video.choose_frames(times, 10.0, Sampling(fps=0.25)) == [0, 120, 240]
    assert video.thin([3, 4, 5], 10) == [3, 4, 5]


# ---------------------------------------------------------------------------------------------
# Writing


@pytest.mark.parametrize("name, codec", [("out.mp4", "libx264"), ("out.webm", "libvpx-vp9")])
def test_write_video_round_trips_atomically(tmp_path, name, codec):
    path = str(tmp_path / name)
    video.write_video(path, vf.pattern(), fps=vf.FPS, codec=codec)
    assert os.listdir(tmp_path) == [name]  # no temporary left beside it
    decoded = decode_video(path, ALL, size=vf.SIDE)
    assert decoded.timestamps == [i / vf.FPS for i in range(vf.FRAMES)] and _mean_error(decoded.frames,
                                                                                         vf.pattern()) < 3.0
    if name.endswith(".mp4"):
        data = open(path, "rb").read()
        assert data.find(b"moov") < data.find(b"mdat")  # faststart: a browser plays it while it loads


def test_write_video_refuses_bad_frames_and_leaves_nothing(tmp_path):
    for frames, fps in [(vf.pattern()[:, :63], 4), (vf.pattern().astype(np.float32), 4), (np.zeros((0, 8, 8, 3),
                        np.uint8), 4), (vf.pattern(), 0)]:
        with pytest.raises(InputError):
            video.write_video(str(tmp_path / "x.mp4"), frames, fps=fps)
    assert os.listdir(tmp_path) == []
