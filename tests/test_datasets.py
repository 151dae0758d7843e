"""Tests of engine.datasets: the MSR-VTT / RIVRL on-disk formats, read and written exactly."""
import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest

from engine import datasets, files
from engine.datasets import (
    BigFile,
    BigFileWriter,
    Collection,
    DataFormatError,
    common_tags,
    read_captions,
    read_tag_vocab,
    read_tags,
    tag_targets,
    video_id_of,
    write_bigfile,
    write_captions,
    write_tag_vocab,
    write_tags,
)
from engine.errors import InputError

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def plain_bigfile(folder: Path, ids, arr, id_text=None, shape_text=None) -> Path:
    """A feature folder written with plain numpy from the format description, not our writer."""
    folder.mkdir(parents=True, exist_ok=True)
    np.asarray(arr).astype("<f4").tofile(folder / "feature.bin")
    n, d = np.asarray(arr).shape
    (folder / "shape.txt").write_text(shape_text if shape_text is not None else f"{n} {d}\n")
    (folder / "id.txt").write_text(id_text if id_text is not None else " ".join(ids))
    return folder


def assert_names(err: pytest.ExceptionInfo, path: Path, line: int | None = None) -> str:
    """The error is a one-line DataFormatError starting with '<path>:<line>: ' or '<path>: '."""
    msg = str(err.value)
    assert "\n" not in msg and "\r" not in msg
    prefix = f"{path}:{line}: " if line is not None else f"{path}: "
    assert msg.startswith(prefix), msg
    assert err.value.path == str(path)
    assert err.value.line == line
    return msg


def siblings(parent: Path) -> list[str]:
    """What a folder holds, less the writers' lock files (`<target>.lock`, kept by design)."""
    return sorted(p.name for p in parent.iterdir() if not p.name.endswith(".lock"))


def raising(exc: BaseException):
    """A stand-in for a function that fails, e.g. a write interrupted by a crash."""

    def fail(*args, **kwargs):
        raise exc

    return fail


@pytest.fixture
def arr():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 4)).astype(np.float32)
    a[0, 0] = np.float32(1e-40)  # a subnormal survives the round trip bit for bit
    a[1, 1] = np.float32(-3.4e38)
    return a


IDS = ["video1_0", "video1_1", "video2_0", "vidéo3_0", "v4", "v5"]


# ----------------------------------------------------------------------------------------------
# ids
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cap_id, video_id",
    [
        ("video7010#enc#3", "video7010"),
        ("video7010#3", "video7010"),
        ("video7010", "video7010"),
        ("v1.mp4#0", "v1"),
        ("img9.jpg#enc#1", "img9"),
        ("v1.mp4", "v1"),
        ("v1.mp4.mp4#0", "v1.mp4"),  # dropped once, like RIVRL's getVideoId
        ("v1.avi#0", "v1.avi"),
    ],
)
def test_video_id_of(cap_id, video_id):
    assert video_id_of(cap_id) == video_id


# ----------------------------------------------------------------------------------------------
# BigFile reading
# ----------------------------------------------------------------------------------------------


def test_plain_numpy_bigfile_reads_back_exactly(tmp_path, arr):
    # Ids across spaces, a tab and newlines: any whitespace separates them.
    id_text = "video1_0 video1_1\tvideo2_0\nvidéo3_0\n\nv4  v5\n"
    folder = plain_bigfile(tmp_path / "feat", IDS, arr, id_text=id_text)
    big = BigFile(folder)
    assert big.ids == IDS
    assert (big.n, big.dim, len(big), big.shape) == (6, 4, 6, (6, 4))
    assert isinstance(big.vectors, np.memmap) and big.vectors.dtype == np.dtype("<f4")
    assert np.array_equal(big.vectors, arr)
    assert "v4" in big and "nope" not in big
    assert big.index_of("vidéo3_0") == 3
    order = ["v5", "video1_0", "v5", "video2_0"]
    got = big.read(order)
    assert got.dtype == np.float32 and got.shape == (4, 4)
    assert np.array_equal(got, arr[[5, 0, 5, 2]])
    assert np.array_equal(big.read_one("video1_1"), arr[1])
    assert big.read([]).shape == (0, 4)
    got[:] = 0  # a copy: the file is untouched
    assert np.array_equal(big.read(order), arr[[5, 0, 5, 2]])


def test_unknown_id_is_a_clear_keyerror(tmp_path, arr):
    big = BigFile(plain_bigfile(tmp_path / "feat", IDS, arr))
    with pytest.raises(KeyError, match="'ghost' is not in .*id.txt"):
        big.index_of("ghost")
    with pytest.raises(KeyError, match="ghost"):
        big.read(["v4", "ghost"])
    with pytest.raises(TypeError):
        big.read("v4")


def test_id_txt_falls_back_to_iso_8859_1(tmp_path, arr):
    folder = plain_bigfile(tmp_path / "feat", IDS[:2], arr[:2])
    (folder / "id.txt").write_bytes(b"caf\xe9 na\xefve")  # not valid UTF-8
    assert BigFile(folder).ids == ["café", "naïve"]


# ----------------------------------------------------------------------------------------------
# BigFile writing
# ----------------------------------------------------------------------------------------------


def test_write_bigfile_round_trip_is_exact(tmp_path, arr):
    folder = write_bigfile(tmp_path / "feat", IDS, arr)
    assert (folder / "feature.bin").read_bytes() == arr.astype("<f4").tobytes()
    # What RIVRL's txt2bin writes: "N D" and the ids space-joined on one line.
    assert (folder / "shape.txt").read_text() == "6 4"
    assert (folder / "id.txt").read_text(encoding="utf-8") == " ".join(IDS)
    big = BigFile(folder)
    assert big.ids == IDS and np.array_equal(big.vectors, arr)
    assert siblings(tmp_path) == ["feat"]  # no temporary folder left behind


def test_write_bigfile_casts_float64_and_ints(tmp_path):
    values = np.array([[0.5, -2.0], [3.0, 1e-3]])
    write_bigfile(tmp_path / "a", ["x", "y"], values)
    assert np.array_equal(BigFile(tmp_path / "a").vectors, values.astype(np.float32))
    write_bigfile(tmp_path / "b", ["x"], np.array([[1, 2]]))
    assert np.array_equal(BigFile(tmp_path / "b").vectors, [[1.0, 2.0]])


def test_streaming_writer_chunks_match_one_write(tmp_path, arr):
    write_bigfile(tmp_path / "one", IDS, arr)
    with BigFileWriter(tmp_path / "chunks", dim=4) as w:
        w.add(IDS[:1], arr[:1])
        w.add([], np.zeros((0, 4)))
        w.add(IDS[1:4], arr[1:4].astype(np.float64))  # cast per chunk
        w.add(IDS[4:], arr[4:])
        assert w.n == 6
        assert not (tmp_path / "chunks").exists()  # nothing at the target until close
    for name in ("feature.bin", "shape.txt", "id.txt"):
        assert (tmp_path / "chunks" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


@pytest.mark.parametrize(
    "ids, rows, match",
    [
        (["a", "b"], np.zeros(8), "2-D"),
        (["a", "b"], np.zeros((2, 4, 1)), "2-D"),
        (["a"], np.zeros((2, 4)), "1 ids for 2 rows"),
        (["a", "b"], np.array([[0, 0, np.nan, 0], [0] * 4]), "non-finite"),
        (["a", "b"], np.array([[0] * 4, [np.inf, 0, 0, 0]]), "non-finite"),
        (["a", "b"], np.full((2, 4), 1e300), "non-finite"),  # overflows float32
        (["a", "a"], np.zeros((2, 4)), "duplicate id 'a'"),
        (["a", "b c"], np.zeros((2, 4)), "whitespace"),
        (["a", ""], np.zeros((2, 4)), "non-empty"),
        (["a", "b"], np.zeros((2, 4), dtype=bool), "real numbers"),
        (["a", "b"], np.zeros((2, 4), dtype=complex), "real numbers"),
    ],
)
def test_write_bigfile_rejects_bad_input(tmp_path, ids, rows, match):
    with pytest.raises(ValueError, match=match):
        write_bigfile(tmp_path / "feat", ids, rows)
    assert siblings(tmp_path) == []  # neither target nor temporary folder


def test_streaming_writer_rejects_bad_blocks(tmp_path):
    target = tmp_path / "feat"
    with BigFileWriter(target, dim=2) as w:
        w.add(["a"], [[1.0, 2.0]])
        with pytest.raises(ValueError, match="duplicate id 'a'"):
            w.add(["b", "a"], np.zeros((2, 2)))
        with pytest.raises(ValueError, match="3 columns, expected dim=2"):
            w.add(["c"], np.zeros((1, 3)))
        with pytest.raises(TypeError):
            w.add("c", np.zeros((1, 2)))
        w.add(["b"], [[3.0, 4.0]])  # a rejected block wrote nothing
    big = BigFile(target)
    assert big.ids == ["a", "b"] and np.array_equal(big.vectors, [[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="no rows"):
        BigFileWriter(tmp_path / "empty", dim=2).close()
    with pytest.raises(ValueError, match="dim"):
        BigFileWriter(tmp_path / "bad", dim=0)
    assert siblings(tmp_path) == ["feat"]


# ----------------------------------------------------------------------------------------------
# video2frames.txt
# ----------------------------------------------------------------------------------------------

V2F = {"video1": ["video1_0", "video1_1"], "video2": ["video2_0"], "vidéo3": ["vidéo3_0"]}


def test_video2frames_round_trip(tmp_path, arr):
    folder = write_bigfile(tmp_path / "feat", IDS, arr, video2frames=V2F)
    assert ast.literal_eval((folder / "video2frames.txt").read_text(encoding="utf-8")) == V2F
    big = BigFile(folder)
    assert big.video2frames() == V2F
    assert big.video_ids() == ["video1", "video2", "vidéo3"]
    assert np.array_equal(big.frames_of("video1"), arr[[0, 1]])
    with pytest.raises(KeyError, match="'video9' is not in"):
        big.frames_of("video9")


def test_frames_keep_file_order_not_id_order(tmp_path, arr):
    folder = plain_bigfile(tmp_path / "feat", IDS, arr)
    (folder / "video2frames.txt").write_text("{'video1': ['video1_1', 'video1_0']}")
    assert np.array_equal(BigFile(folder).frames_of("video1"), arr[[1, 0]])


def test_streaming_add_video_writes_video2frames(tmp_path, arr):
    with BigFileWriter(tmp_path / "feat", dim=4) as w:
        w.add_video("video1", IDS[:2], arr[:2])
        w.add_video("video2", IDS[2:3], arr[2:3])
        w.add(IDS[3:], arr[3:])  # rows outside any video are allowed
        with pytest.raises(ValueError, match="duplicate video id"):
            w.add_video("video1", ["z"], arr[:1])
    big = BigFile(tmp_path / "feat")
    assert big.video2frames() == {"video1": IDS[:2], "video2": IDS[2:3]}
    assert np.array_equal(big.vectors, arr)


def test_video2frames_missing_is_an_error(tmp_path, arr):
    big = BigFile(plain_bigfile(tmp_path / "feat", IDS, arr))
    assert not big.has_video2frames and big.video_ids() == IDS
    with pytest.raises(DataFormatError) as err:
        big.video2frames()
    assert_names(err, tmp_path / "feat" / "video2frames.txt")


@pytest.mark.parametrize(
    "code",
    [
        "__import__('os').system('touch {marker}')",
        "{{'video1': __import__('os').system('touch {marker}')}}",
        "{{'video1': ['video1_0'],\n 'video2': [open('{marker}', 'w').write('x')]}}",
    ],
)
def test_video2frames_with_code_is_rejected_not_run(tmp_path, arr, code):
    marker = tmp_path / "executed"
    folder = plain_bigfile(tmp_path / "feat", IDS, arr)
    (folder / "video2frames.txt").write_text(code.format(marker=marker))
    with pytest.raises(DataFormatError, match="never executed") as err:
        BigFile(folder).video2frames()
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{folder / 'video2frames.txt'}:")
    assert not marker.exists()


@pytest.mark.parametrize(
    "text, line, match",
    [
        ("{'video1': ['video1_0'],\n 'video2': ['video2_0'", 2, "not a Python literal"),
        ("['video1_0']", 1, "expected a dict"),
        ("{'video1': 'video1_0'}", 1, "must be a list of str"),
        ("{'video1': ['video1_0', 7]}", 1, "must be a list of str"),
        ("{'video1': ['video1_0'],\n 'video2': ['ghost']}", 2, "frame 'ghost' of video 'video2'"),
        ("{'video1': ['video1_0'],\n 'video1': ['video1_1']}", 2, "duplicate video id 'video1'"),
        ("{1: ['video1_0']}", None, "video id 1 is not a str"),
    ],
)
def test_malformed_video2frames(tmp_path, arr, text, line, match):
    folder = plain_bigfile(tmp_path / "feat", IDS, arr)
    (folder / "video2frames.txt").write_text(text)
    with pytest.raises(DataFormatError, match=match) as err:
        BigFile(folder).video2frames()
    assert_names(err, folder / "video2frames.txt", line)


# ----------------------------------------------------------------------------------------------
# malformed feature folders: one test per case
# ----------------------------------------------------------------------------------------------


def test_feature_bin_too_short(tmp_path, arr):
    folder = plain_bigfile(tmp_path / "feat", IDS, arr)
    (folder / "feature.bin").write_bytes(arr.astype("<f4").tobytes()[:-4])
    with pytest.raises(DataFormatError) as err:
        BigFile(folder)
    msg = assert_names(err, folder / "feature.bin")
    assert "expected 96 bytes" in msg and "found 92 bytes" in msg


def test_feature_bin_too_long(tmp_path, arr):
    folder = plain_bigfile(tmp_path / "feat", IDS, arr)
    (folder / "feature.bin").write_bytes(arr.astype("<f4").tobytes() + b"\0\0\0\0")
    with pytest.raises(DataFormatError) as err:
        BigFile(folder)
    msg = assert_names(err, folder / "feature.bin")
    assert "expected 96 bytes" in msg and "found 100 bytes" in msg


@pytest.mark.parametrize(
    "shape_text, line",
    [
        ("", None),
        ("6\n", 1),
        ("6 x\n", 1),
        ("6 4 1\n", 1),
        ("6.0 4\n", 1),
        ("0 4\n", 1),
        ("-6 4\n", 1),
        ("6 4\n6 4\n", 2),
    ],
)
def test_malformed_shape_txt(tmp_path, arr, shape_text, line):
    folder = plain_bigfile(tmp_path / "feat", IDS, arr, shape_text=shape_text)
    with pytest.raises(DataFormatError) as err:
        BigFile(folder)
    assert_names(err, folder / "shape.txt", line)


def test_shape_txt_without_newline_is_fine(tmp_path, arr):
    folder = plain_bigfile(tmp_path / "feat", IDS, arr, shape_text="6 4")
    assert BigFile(folder).shape == (6, 4)


def test_id_count_mismatch(tmp_path, arr):
    folder = plain_bigfile(tmp_path / "feat", IDS, arr, id_text=" ".join(IDS[:5]))
    with pytest.raises(DataFormatError) as err:
        BigFile(folder)
    msg = assert_names(err, folder / "id.txt")
    assert "5 ids" in msg and "N=6" in msg


def test_duplicate_ids(tmp_path, arr):
    id_text = "video1_0 video1_1 video2_0\nv4 video1_1 v5\n"
    folder = plain_bigfile(tmp_path / "feat", IDS, arr, id_text=id_text)
    with pytest.raises(DataFormatError, match="duplicate id 'video1_1'") as err:
        BigFile(folder)
    assert_names(err, folder / "id.txt", 2)


@pytest.mark.parametrize("missing", ["feature.bin", "shape.txt", "id.txt"])
def test_missing_feature_file(tmp_path, arr, missing):
    folder = plain_bigfile(tmp_path / "feat", IDS, arr)
    (folder / missing).unlink()
    with pytest.raises(DataFormatError, match="not found") as err:
        BigFile(folder)
    assert_names(err, folder / missing)


def test_missing_feature_folder(tmp_path):
    with pytest.raises(DataFormatError, match="not found") as err:
        BigFile(tmp_path / "nope")
    assert_names(err, tmp_path / "nope")


def test_data_format_error_is_a_picklable_value_error(tmp_path):
    import pickle

    e = DataFormatError(tmp_path / "x.txt", "bad\nthing", 3)
    assert isinstance(e, ValueError)
    assert str(e) == f"{tmp_path / 'x.txt'}:3: bad\\nthing"
    again = pickle.loads(pickle.dumps(e))
    assert (str(again), again.line) == (str(e), 3)


# ----------------------------------------------------------------------------------------------
# atomicity
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path, arr):
    """A complete feature folder that a failed rewrite must leave intact."""
    return write_bigfile(tmp_path / "feat", IDS, arr, video2frames=V2F)


def assert_still_good(folder: Path, arr) -> None:
    big = BigFile(folder)
    assert big.ids == IDS and np.array_equal(big.vectors, arr) and big.video2frames() == V2F


def test_crash_while_streaming_keeps_previous_folder(tmp_path, arr, good):
    with pytest.raises(RuntimeError, match="boom"), BigFileWriter(good, dim=4) as w:
        w.add(["n1", "n2"], np.ones((2, 4)))
        raise RuntimeError("boom")  # e.g. the feature extractor dies mid-way
    assert_still_good(good, arr)
    assert siblings(tmp_path) == ["feat"]


def test_crash_while_writing_metadata_keeps_previous_folder(tmp_path, arr, good, monkeypatch):
    real = files.write_synced

    def fail_on_ids(path, data):
        if Path(path).name == "id.txt":
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(files, "write_synced", fail_on_ids)
    with pytest.raises(OSError, match="disk full"):
        write_bigfile(good, ["n1"], np.ones((1, 4)))
    assert_still_good(good, arr)
    assert siblings(tmp_path) == ["feat"]


def test_hard_crash_leaves_only_a_hidden_temporary_folder(tmp_path, arr, good, monkeypatch):
    # A killed process runs no clean-up: disable it and fail mid-write.
    monkeypatch.setattr(BigFileWriter, "abort", lambda self: None)
    monkeypatch.setattr(files, "write_synced", raising(OSError("killed")))
    with pytest.raises(OSError, match="killed"):
        write_bigfile(good, ["n1"], np.ones((1, 4)))
    assert_still_good(good, arr)
    leftovers = [n for n in siblings(tmp_path) if n != "feat"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".feat.tmp-")
    # The half-written folder is incomplete and is not the target.
    assert sorted(os.listdir(tmp_path / leftovers[0])) == ["feature.bin"]


def test_failed_swap_restores_previous_folder(tmp_path, arr, good, monkeypatch):
    monkeypatch.setenv("CVR_RENAME_EXCHANGE", "0")  # the two-rename swap, where exchange is unsupported
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # old folder already moved aside; moving the new one in fails
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(datasets.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        write_bigfile(good, ["n1"], np.ones((1, 4)))
    monkeypatch.undo()
    assert calls[0][0] == "feat" and calls[0][1].startswith(".feat.old-")
    assert_still_good(good, arr)
    assert siblings(tmp_path) == ["feat"]


def test_crash_on_first_write_leaves_no_target(tmp_path, arr, monkeypatch):
    monkeypatch.setattr(files, "write_synced", raising(OSError("x")))
    with pytest.raises(OSError):
        write_bigfile(tmp_path / "new", IDS, arr)
    assert siblings(tmp_path) == []


def test_rewrite_replaces_folder_and_drops_stale_files(tmp_path, arr, good):
    write_bigfile(good, ["n1"], np.ones((1, 4)))
    big = BigFile(good)
    assert big.ids == ["n1"] and not big.has_video2frames  # the old video2frames.txt is gone
    assert siblings(tmp_path) == ["feat"]


def test_crash_while_writing_captions_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "c.caption.txt"
    write_captions(path, [("v1#0", "old caption")])
    monkeypatch.setattr(datasets.os, "replace", raising(OSError("crash")))
    with pytest.raises(OSError, match="crash"):
        write_captions(path, [("v1#0", "new caption")])
    monkeypatch.undo()
    assert read_captions(path) == [("v1#0", "old caption")]
    assert siblings(tmp_path) == ["c.caption.txt"]


# ----------------------------------------------------------------------------------------------
# captions
# ----------------------------------------------------------------------------------------------


def test_read_captions_parsing(tmp_path):
    path = tmp_path / "msrvtt10ktrain.caption.txt"
    path.write_bytes(
        b"video7010#enc#0 a man is  talking about cars\r\n"
        b"\n"
        b"video7010#enc#1\ta man\ttalks\n"
        b"   \n"
        b"clip.mp4#0 someone cooks \n"
        b"photo.jpg#enc#2 a dog runs\n"
        b"video12 no hash at all"  # no final newline
    )
    pairs = read_captions(path)
    assert pairs == [
        ("video7010#enc#0", "a man is  talking about cars"),  # inner whitespace kept
        ("video7010#enc#1", "a man\ttalks"),  # split on the first whitespace only
        ("clip.mp4#0", "someone cooks"),
        ("photo.jpg#enc#2", "a dog runs"),
        ("video12", "no hash at all"),
    ]
    assert [video_id_of(c) for c, _ in pairs] == ["video7010", "video7010", "clip", "photo", "video12"]


def test_captions_utf8_and_latin1(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes("v1#0 un café\n".encode())
    assert read_captions(path) == [("v1#0", "un café")]
    path.write_bytes("v1#0 un café\n".encode("iso-8859-1"))
    assert read_captions(path) == [("v1#0", "un café")]


@pytest.mark.parametrize(
    "text, line, match",
    [
        ("v1#0 ok\nv1#1\n", 2, "no caption text"),
        ("v1#0 ok\nv1#1   \n", 2, "no caption text"),
        ("v1#0 ok\n\n  leading space\n", 3, "empty cap_id"),
        ("#0 no video\n", 1, "empty video id"),
    ],
)
def test_bad_caption_line(tmp_path, text, line, match):
    path = tmp_path / "c.txt"
    path.write_text(text)
    with pytest.raises(DataFormatError, match=match) as err:
        read_captions(path)
    assert_names(err, path, line)


def test_duplicate_caption_id(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("v1#0 one\nv1#1 two\nv1#0 three\n")
    with pytest.raises(DataFormatError, match=r"duplicate cap_id 'v1#0' \(first on line 1\)") as err:
        read_captions(path)
    assert_names(err, path, 3)


def test_missing_caption_file(tmp_path):
    with pytest.raises(DataFormatError, match="not found") as err:
        read_captions(tmp_path / "none.txt")
    assert_names(err, tmp_path / "none.txt")


def test_write_captions_round_trip_and_checks(tmp_path):
    pairs = [("video1#enc#0", "a man  sings"), ("v2.mp4#1", "ünïcode ok")]
    path = write_captions(tmp_path / "sub" / "c.txt", pairs)
    assert read_captions(path) == pairs
    assert path.read_text(encoding="utf-8") == "video1#enc#0 a man  sings\nv2.mp4#1 ünïcode ok\n"
    for bad in ([("a b", "x")], [("a", "x"), ("a", "y")], [("a", "")], [("a", " x")], [("a", "x\ny")]):
        with pytest.raises(ValueError):
            write_captions(tmp_path / "bad.txt", bad)
    assert not (tmp_path / "bad.txt").exists()
    assert siblings(tmp_path / "sub") == ["c.txt"]


# ----------------------------------------------------------------------------------------------
# tags
# ----------------------------------------------------------------------------------------------


def test_read_tags_parsing(tmp_path):
    path = tmp_path / "video_label_th_1.txt"
    path.write_text(
        "video0\tman:3 car:1\n"
        "video1\t\n"  # empty part after the tab
        "\n"
        "video2\tre:run:2  time:10\n"  # a tag containing ':' splits on the last one
    )
    assert read_tags(path) == {
        "video0": {"man": 3, "car": 1},
        "video1": {},
        "video2": {"re:run": 2, "time": 10},
    }


@pytest.mark.parametrize(
    "text, line, match",
    [
        ("video0\tman:1\nvideo1 man:2\n", 2, "no tab"),
        ("video0\tman:1\nvideo1\n", 2, "no tab"),
        ("video0\tman:x\n", 1, "not a non-negative integer: 'x'"),
        ("video0\tman:1.5\n", 1, "not a non-negative integer"),
        ("video0\tman:-1\n", 1, "not a non-negative integer"),
        ("video0\tman:\n", 1, "not a non-negative integer"),
        ("video0\tman\n", 1, "malformed tag:count 'man'"),
        ("video0\t:3\n", 1, "malformed tag:count"),
        ("video0\tman:1 man:2\n", 1, "appears twice"),
        ("\tman:1\n", 1, "video id"),
        ("video0\tman:1\nvideo0\tcar:1\n", 2, "duplicate video id 'video0'"),
    ],
)
def test_bad_tag_line(tmp_path, text, line, match):
    path = tmp_path / "tags.txt"
    path.write_text(text)
    with pytest.raises(DataFormatError, match=match) as err:
        read_tags(path)
    assert_names(err, path, line)


def test_write_tags_round_trip(tmp_path):
    tags = {"video0": {"man": 3, "a:b": 1}, "video1": {}}
    path = write_tags(tmp_path / "tags.txt", tags)
    assert path.read_text() == "video0\tman:3 a:b:1\nvideo1\t\n"
    assert read_tags(path) == tags
    with pytest.raises(ValueError):
        write_tags(tmp_path / "bad.txt", {"v": {"man": -1}})
    with pytest.raises(ValueError):
        write_tags(tmp_path / "bad.txt", {"v": {"two words": 1}})


def test_tag_vocab_round_trip(tmp_path):
    path = write_tag_vocab(tmp_path / "tag_vocab_3.json", ["man", "dog", "café"])
    assert read_tag_vocab(path) == ["man", "dog", "café"]
    assert json.loads(path.read_text(encoding="utf-8")) == ["man", "dog", "café"]
    with pytest.raises(ValueError):
        write_tag_vocab(tmp_path / "bad.json", ["a", "a"])


@pytest.mark.parametrize(
    "text, line, match",
    [
        ('["man",\n "dog",\n]', 3, "invalid JSON"),
        ("", 1, "invalid JSON"),
        ('{"man": 1}', None, "expected a JSON list"),
        ('["man", 3]', None, "entry 1 is not a string"),
        ('["man", "dog", "man"]', None, "duplicate tag 'man' at entry 2"),
    ],
)
def test_bad_tag_vocab_json(tmp_path, text, line, match):
    path = tmp_path / "tag_vocab_512.json"
    path.write_text(text)
    with pytest.raises(DataFormatError, match=match) as err:
        read_tag_vocab(path)
    assert_names(err, path, line)


def test_tag_targets_hand_worked():
    vocab = ["man", "dog", "car"]
    video_tags = {
        "v1": {"man": 4, "tree": 10, "dog": 2},  # 'tree' is outside the vocab: ignored, also for the max
        "v2": {"tree": 3},  # nothing in the vocab: zeros
        "v3": {"car": 3, "dog": 1},
        "v4": {},
        "v5": {"man": 0},  # only zero counts: zeros, no division by zero
    }
    expected = np.array(
        [[1.0, 0.5, 0.0], [0, 0, 0], [0.0, 1 / 3, 1.0], [0, 0, 0], [0, 0, 0]], dtype=np.float32
    )
    got = tag_targets(video_tags, vocab)
    assert got.dtype == np.float32 and got.shape == (5, 3)
    assert np.array_equal(got, expected)
    assert np.array_equal(tag_targets(video_tags, vocab, ["v3", "v1"]), expected[[2, 0]])
    with pytest.raises(KeyError, match="v9"):
        tag_targets(video_tags, vocab, ["v9"])


def test_common_tags_by_document_frequency():
    video_tags = {
        "v1": {"background": 3, "red": 2, "moves": 1},
        "v2": {"background": 1, "blue": 2, "moves": 0},  # a zero count is not carrying the tag
        "v3": {"background": 2, "red": 1},
        "v4": {"background": 1, "green": 1, "moves": 2},
        "v5": {"green": 9},  # not among the videos counted
    }
    ids = ["v1", "v2", "v3", "v4"]
    assert common_tags(video_tags, ids, 0.5) == {"background"}  # 4/4 > 0.5; moves and red: 2/4, not more
    assert common_tags(video_tags, ids, 0.49) == {"background", "moves", "red"}
    assert common_tags(video_tags, ids, 1.0) == set()  # RIVRL's recipe: nothing dropped
    with pytest.raises(InputError, match="max_df"):
        common_tags(video_tags, ids, 0.0)
    with pytest.raises(KeyError, match="v9"):
        common_tags(video_tags, ["v9"], 0.5)


# ----------------------------------------------------------------------------------------------
# Collection
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def collection_root(tmp_path, arr):
    """A miniature msrvtt10k in the release's layout."""
    col = tmp_path / "msrvtt10k"
    write_bigfile(col / "FeatureData" / "resnext101", IDS, arr, video2frames=V2F)
    text = col / "TextData"
    write_captions(text / "msrvtt10ktrain.caption.txt", [
        ("video2#enc#0", "a"), ("video1#enc#0", "b"), ("video2#enc#1", "c"), ("video1#enc#1", "d"),
    ])
    write_captions(text / "msrvtt10kval.caption.txt", [("vidéo3#0", "e"), ("video9#0", "f")])
    write_tags(text / "tags" / "video_label_th_1.txt", {"video1": {"man": 2}, "video2": {}})
    write_tag_vocab(text / "tags" / "video_label_th_1" / "tag_vocab_512.json", ["man", "dog"])
    return tmp_path


def test_collection_paths_and_loaders(collection_root, arr):
    c = Collection(collection_root, "msrvtt10k")
    base = collection_root / "msrvtt10k"
    assert c.feature_dir("resnext101") == base / "FeatureData" / "resnext101"
    assert c.caption_path("test") == base / "TextData" / "msrvtt10ktest.caption.txt"
    assert c.tags_path() == base / "TextData" / "tags" / "video_label_th_1.txt"
    assert c.tag_vocab_path(256) == base / "TextData" / "tags" / "video_label_th_1" / "tag_vocab_256.json"
    assert c.features("resnext101") is c.features("resnext101")
    assert np.array_equal(c.features("resnext101").frames_of("video2"), arr[[2]])
    assert c.captions("val") == [("vidéo3#0", "e"), ("video9#0", "f")]
    assert c.split_video_ids("train") == ["video2", "video1"]  # order of first appearance
    assert c.tags() == {"video1": {"man": 2}, "video2": {}}
    assert c.tag_vocab() == ["man", "dog"]
    with pytest.raises(ValueError, match="split"):
        c.caption_path("dev")


def test_collection_missing_paths(collection_root):
    with pytest.raises(DataFormatError, match="collection folder not found") as err:
        Collection(collection_root, "tgif")
    assert_names(err, collection_root / "tgif")
    c = Collection(collection_root, "msrvtt10k")
    with pytest.raises(DataFormatError, match="not found") as err:
        c.captions("test")
    assert_names(err, c.caption_path("test"))
    with pytest.raises(DataFormatError) as err:
        c.tag_vocab(1024)
    assert_names(err, c.tag_vocab_path(1024))
    with pytest.raises(DataFormatError) as err:
        c.features("i3d")
    assert_names(err, c.feature_dir("i3d"))


def test_collection_summary(collection_root):
    s = Collection(collection_root, "msrvtt10k").summary("resnext101")
    assert s["dim"] == 4 and s["vectors"] == 6
    assert s["splits"] == {
        "train": {"videos": 2, "captions": 4, "videos_without_features": 0},
        "val": {"videos": 2, "captions": 2, "videos_without_features": 1},
        "test": None,
    }
    assert s["frames_per_video"] == {"videos": 3, "min": 1, "mean": 4 / 3, "max": 2}
    assert s["tag_vocab_size"] == 2
    json.dumps(s)  # ready to print as JSON
