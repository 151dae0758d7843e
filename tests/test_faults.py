"""Faults and hostile input: nothing lost, nothing silently wrong (issue 13).

Each test drives a command (or the writer it goes through) into a fault and asserts what a user
sees: one line on stderr, the exit code, and the old files byte for byte. Kills are real SIGKILLs,
injected at named steps of a write (engine.files.fault_point) in a child process, not timed.
"""
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from engine import files, locks
from engine.cli import main
from engine.errors import CVRError
from engine.gallery import Gallery
from engine.indexing import write_gallery
from engine.integrity import STAMP

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
FEATURE = "resnext101-resnet152"


def snapshot(path) -> dict:
    """Every file under `path` (or `path` itself) as relative name -> bytes: what must not change
    (less the verified stamp, which a load may write: engine.integrity)."""
    path = Path(path)
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != STAMP}


def foreign_folder(path) -> dict:
    """A folder of someone's own files, which no command may replace."""
    path = Path(path)
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("keep me\n")
    (path / "sub" / "data.bin").write_bytes(os.urandom(64))
    return snapshot(path)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cvr: error: "), err
    return err[0]


def child_env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OPENBLAS_NUM_THREADS="1",
                **extra)


def cvr(*argv, **env) -> subprocess.CompletedProcess:
    """The command line in a child process (for kills, locks and races)."""
    return subprocess.run([sys.executable, "-m", "engine.cli", *argv], env=child_env(**env), capture_output=True,
                          text=True, timeout=300)


# ---------------------------------------------------------------------------------------------
# 1. No command replaces what it did not write


def _commands(msrvtt, ckpt, tmp_path) -> dict:
    """Each writing command with its output path left as {out} (every other argument valid)."""
    data = ["--root", msrvtt, "--collection", "msrvtt10k"]
    some_dir = str(tmp_path / "some_dir")
    os.makedirs(some_dir, exist_ok=True)
    return {
        "train": ["train", *data, "--feature", FEATURE, "--anchors", "none", "--epochs", "1", "--out", "{out}"],
        "index": ["index", "--checkpoint", ckpt, *data, "--quiet", "--out", "{out}"],
        "export": ["export", "--checkpoint", ckpt, "--quiet", "--out", "{out}"],
        "anchors": ["anchors", "--generator", some_dir, *data, "--quiet", "--out", "{out}"],
        "anchors --png": ["anchors", "--generator", some_dir, *data, "--quiet", "--out", str(tmp_path / "store"),
                          "--png", "{out}"],
        "vision train": ["vision", "train", "--out", "{out}"],
        "evaluate": ["evaluate", "--checkpoint", ckpt, *data, "--split", "test", "--out", "{out}"],
        "generator train": ["generator", "train", *data, "--quiet", "--out", "{out}"],
        "generator lora": ["generator", "lora", "--base", some_dir, *data, "--quiet", "--out", "{out}"],
        "generator distill": ["generator", "distill", "--teacher", some_dir, "--quiet", "--out", "{out}"],
    }


COMMANDS = ["train", "index", "export", "anchors", "anchors --png", "vision train", "evaluate", "generator train",
            "generator lora", "generator distill"]


@pytest.mark.parametrize("command", COMMANDS)
def test_no_command_replaces_a_folder_or_file_it_did_not_write(command, msrvtt, tiny_ckpt, tmp_path, capsys):
    argv = _commands(msrvtt, tiny_ckpt, tmp_path)[command]
    if command in ("vision train", "evaluate"):  # these write files: a file of someone else's
        target = tmp_path / "mine.safetensors" if command == "vision train" else tmp_path / "report"
        victim = target if command == "vision train" else Path(f"{target}.json")
        victim.write_bytes(b'{"mine": true}\n')
        before = snapshot(victim)
    else:
        target = victim = tmp_path / "X"
        before = foreign_folder(target)
    assert main([a.replace("{out}", str(target)) for a in argv]) == 2
    line = one_error_line(capsys)
    assert "--overwrite" in line and str(target) in line
    assert snapshot(victim) == before


def test_data_synth_refuses_a_foreign_collection_and_overwrite_replaces(tmp_path, capsys):
    before = foreign_folder(tmp_path / "synth")
    argv = ["data", "synth", "--root", str(tmp_path), "--videos", "8", "--captions", "2", "--frames", "2"]
    assert main(argv) == 2
    assert "--overwrite" in one_error_line(capsys)
    assert snapshot(tmp_path / "synth") == before


def test_train_overwrite_replaces_and_a_checkpoint_is_updated_in_place(msrvtt, tmp_path, capsys):
    from conftest import TINY_TRAIN

    out = tmp_path / "X"
    foreign_folder(out)
    argv = ["train", "--root", msrvtt, "--collection", "msrvtt10k", "--feature", FEATURE, "--anchors", "none",
            "--out", str(out), *TINY_TRAIN]
    assert main([*argv, "--overwrite"]) == 0
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()
    assert main(argv) == 0  # a checkpoint may replace a checkpoint without --overwrite
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------
# 2. Concurrent writers: an OS lock beside the folder


@pytest.fixture()
def small_gallery(tiny_ckpt, msrvtt, tmp_path):
    out = str(tmp_path / "G")
    argv = ["index", "--checkpoint", tiny_ckpt, "--root", msrvtt, "--collection", "msrvtt10k", "--split", "test",
            "--out", out, "--quiet"]
    assert main(argv) == 0
    return out


def _append(tiny_ckpt, msrvtt, out, split, **env):
    return subprocess.Popen([sys.executable, "-m", "engine.cli", "index", "--checkpoint", tiny_ckpt, "--root",
                             msrvtt, "--collection", "msrvtt10k", "--split", split, "--out", out, "--append",
                             "--quiet"], env=child_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_two_concurrent_appends_both_land(small_gallery, tiny_ckpt, msrvtt):
    before = Gallery.load(small_gallery)
    racers = [_append(tiny_ckpt, msrvtt, small_gallery, split) for split in ("train", "val")]
    results = [(r.wait(timeout=300), r.stderr.read()) for r in racers]
    for racer in racers:
        racer.stdout.close()
        racer.stderr.close()
    assert [code for code, _ in results] == [0, 0], results
    after = Gallery.load(small_gallery)
    splits = sorted(source["split"] for source in after.manifest["sources"])
    assert splits == ["test", "train", "val"]
    assert len(after) == len(set(after.ids)) == len(before) + sum(s["count"] for s in after.manifest["sources"][1:])


def test_a_held_lock_makes_a_writer_wait_or_refuse(small_gallery, tiny_ckpt, msrvtt):
    before = snapshot(small_gallery)
    with locks.lock(small_gallery):
        refused = _append(tiny_ckpt, msrvtt, small_gallery, "val", CVR_LOCK_TIMEOUT="2")
        code, err = refused.wait(timeout=300), refused.stderr.read()
        refused.stdout.close()
        refused.stderr.close()
        assert code == 2 and f"pid {os.getpid()}" in err.strip().splitlines()[-1], err
        assert snapshot(small_gallery) == before
        waiting = _append(tiny_ckpt, msrvtt, small_gallery, "val")
        while "waiting for" not in waiting.stderr.readline():
            assert waiting.poll() is None
    assert waiting.wait(timeout=300) == 0  # it got the lock once we let go
    waiting.stdout.close()
    waiting.stderr.close()
    assert [s["split"] for s in Gallery.load(small_gallery).manifest["sources"]] == ["test", "val"]


def test_the_os_releases_a_dead_writers_lock(tmp_path):
    target = str(tmp_path / "folder")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from engine import locks\n"
                               "with locks.lock(sys.argv[1]):\n print('held', flush=True); time.sleep(600)", target],
                              env=child_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(locks.LockedError, match=f"pid {holder.pid}"):
        with locks.lock(target, timeout=0.2):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    holder.stdout.close()
    with locks.lock(target, timeout=5):
        pass


# ---------------------------------------------------------------------------------------------
# 3. Crash-consistent swaps: SIGKILL at every step of a write

WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from engine.indexing import write_gallery

    out, count = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(count)
    lat = rng.normal(size=(count, 2, 8)).astype(np.float32)
    lat /= np.linalg.norm(lat, axis=-1, keepdims=True)
    con = rng.random((count, 2, 5)).astype(np.float32)
    write_gallery(out, [f"v{i}" for i in range(count)], lat, con, {"id": "c" * 64, "path": "ckpt"},
                  dtype="float32", faiss="flat")
""")


def _write_in_child(out, count, kill_at=None, exchange=True):
    env = {"CVR_TEST_KILL_AT": kill_at or "", "CVR_RENAME_EXCHANGE": "1" if exchange else "0"}
    return subprocess.run([sys.executable, "-c", WRITER, str(out), str(count)], env=child_env(**env),
                          capture_output=True, text=True, timeout=120)


def _siblings(folder) -> list:
    parent, name = os.path.split(str(folder))
    return sorted(e for e in os.listdir(parent) if e.startswith(f".{name}."))


@pytest.mark.parametrize("kill_at,exchange", [("before-swap", True), ("after-swap", True),
                                              ("before-swap", False), ("between-renames", False),
                                              ("after-swap", False)])
def test_a_kill_at_any_step_of_a_swap_leaves_the_old_or_the_new_gallery(kill_at, exchange, tmp_path):
    out = tmp_path / "G"
    assert _write_in_child(out, 5).returncode == 0
    old = snapshot(out)
    killed = _write_in_child(out, 7, kill_at, exchange)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if kill_at == "between-renames":
        assert not out.exists()  # the moment two renames cannot cover: the next reader recovers it
    gallery = Gallery.load(str(out))  # recovers a folder moved aside, then reads
    assert len(gallery) == (7 if kill_at == "after-swap" else 5)
    if kill_at != "after-swap":
        assert snapshot(out) == old
    # The next writer cleans what the dead one left, and writes.
    assert _write_in_child(out, 9).returncode == 0
    assert len(Gallery.load(str(out))) == 9 and _siblings(out) == []


def test_a_cli_append_killed_mid_swap_is_recovered_by_the_next_append(small_gallery, tiny_ckpt, msrvtt):
    argv = ["index", "--checkpoint", tiny_ckpt, "--root", msrvtt, "--collection", "msrvtt10k", "--out",
            small_gallery, "--append", "--quiet"]
    before = Gallery.load(small_gallery).ids
    killed = cvr(*argv, "--split", "val", CVR_TEST_KILL_AT="between-renames", CVR_RENAME_EXCHANGE="0")
    assert killed.returncode == -signal.SIGKILL and not os.path.exists(small_gallery)
    assert main([*argv, "--split", "val"]) == 0
    after = Gallery.load(small_gallery)
    assert after.ids[: len(before)] == before and len(after) > len(before) and _siblings(small_gallery) == []


def test_every_writer_cleans_a_dead_writers_leftovers(tmp_path):
    """Checkpoints, anchor stores, exports and galleries share the staged writer: a dead writer's
    staging and moved-aside folders go at the next write of any of them."""
    target = tmp_path / "thing"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    staging = tmp_path / f".thing.tmp-{dead.pid}-abcd"
    staging.mkdir()
    (staging / "big.bin").write_bytes(b"x" * 1024)
    with files.staged_folder(target) as work:
        (work / "a.txt").write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["thing", "thing.lock"]


# ---------------------------------------------------------------------------------------------
# 4. Never silently wrong: non-finite values are refused, JSON is always JSON


@pytest.fixture()
def nan_checkpoint(tiny_model, tmp_path):
    """A checkpoint whose training diverged: written properly (valid digests), NaN inside."""
    import copy

    import torch

    from engine.checkpoint import save_checkpoint

    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
    folder = str(tmp_path / "nan_ckpt")
    save_checkpoint(model, folder)
    return folder


def test_nan_weights_are_refused_at_load_with_one_line(nan_checkpoint, small_gallery, capsys):
    argv = ["search", "--gallery", small_gallery, "--checkpoint", nan_checkpoint, "--json", "-k", "2", "a dog"]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert "NaN or infinite" in line and "model.safetensors" in line
    assert main(["doctor", nan_checkpoint]) == 2
    assert "NaN or infinite" in capsys.readouterr().out


def test_non_finite_scores_never_print(small_gallery, tiny_ckpt, monkeypatch, capsys):
    from engine.backends.pytorch import TorchPipeline

    real = TorchPipeline.encode_queries

    def poisoned(self, text, regions=None):
        lat, con = real(self, text, regions)
        return lat * float("nan"), con
    monkeypatch.setattr(TorchPipeline, "encode_queries", poisoned)
    assert main(["search", "--gallery", small_gallery, "--checkpoint", tiny_ckpt, "--json", "-k", "2", "a dog"]) == 2
    assert "NaN or infinite" in one_error_line(capsys)
    monkeypatch.undo()
    assert main(["search", "--gallery", small_gallery, "--checkpoint", tiny_ckpt, "--json", "-k", "3", "a dog"]) == 0
    results = json.loads(capsys.readouterr().out, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert len(results[0]["results"]) == 3


def test_a_gallery_of_non_finite_embeddings_is_never_written(tmp_path):
    lat = np.ones((3, 2, 4), np.float32)
    lat[1, 0, 2] = np.inf
    with pytest.raises(CVRError, match="NaN or infinite"):
        write_gallery(str(tmp_path / "G"), ["a", "b", "c"], lat, np.ones((3, 2, 2), np.float32), {"id": "x" * 64})
    assert not (tmp_path / "G").exists() and _siblings(tmp_path / "G") == []


# ---------------------------------------------------------------------------------------------
# 5. One line, always: config fuzz, full disk, permissions, arguments checked before models load


FUZZ = ["512", 5.5, float("nan"), None, [], True, -3]


def _unsealed_copy(ckpt, tmp_path, name="fuzzed"):
    """A copy of a checkpoint whose config.json records no digest (as before digests were
    recorded), so that its fields are checked one by one rather than refused as edited."""
    target = tmp_path / name
    shutil.copytree(ckpt, target)
    config = json.loads((target / "config.json").read_text())
    config.pop("digest")
    return target, config


@pytest.mark.parametrize("field", ["latent_dim", "concept_dim", "dropout", "attention", "use_anchor", "text"])
def test_config_fields_of_the_wrong_type_are_refused_never_coerced(field, tiny_ckpt, small_gallery, tmp_path,
                                                                  capsys):
    target, config = _unsealed_copy(tiny_ckpt, tmp_path)
    original = config["model"][field]
    for value in FUZZ:
        if type(value) is type(original) and field == "use_anchor":
            continue  # a valid value of the field: not what this test is about
        config["model"][field] = value
        (target / "config.json").write_text(json.dumps(config))  # json writes NaN as NaN, as an editor might
        code = main(["search", "--gallery", small_gallery, "--checkpoint", str(target), "-k", "2", "a dog"])
        line = one_error_line(capsys)
        assert code == 2 and "config.json" in line, (field, value, line)


def test_an_edited_config_or_manifest_is_refused_by_its_digest(tiny_ckpt, small_gallery, tmp_path, capsys):
    target = tmp_path / "edited"
    shutil.copytree(tiny_ckpt, target)
    config = json.loads((target / "config.json").read_text())
    config["model"]["dropout"] = 0.5  # a valid value: only the digest can tell
    (target / "config.json").write_text(json.dumps(config))
    assert main(["search", "--gallery", small_gallery, "--checkpoint", str(target), "-k", "2", "a dog"]) == 2
    assert "edited or damaged" in one_error_line(capsys)
    manifest_path = Path(small_gallery) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["checkpoint"]["id"] = "f" * 64  # a gallery passed off as another model's
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CVRError, match="manifest.json: edited or damaged"):
        Gallery.load(small_gallery)


def test_arguments_are_checked_before_any_model_loads(small_gallery, tiny_ckpt, monkeypatch, capsys):
    import engine.backends.pytorch as torch_backend

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")
    monkeypatch.setattr(torch_backend, "load_checkpoint", never)
    common = ["search", "--gallery", small_gallery, "--checkpoint", tiny_ckpt]
    for argv, needle in ([["-k", "100000", "q"], "-k 100000"], [["--device", "cuda:7", "q"], "no CUDA GPU"],
                         [["--backend", "triton", "q"], "triton"], [["--backend", "tensorrt", "q"], "TensorRT"]):
        if "triton" in argv:
            monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert main(common + argv) == 2
        assert needle in one_error_line(capsys)


def _mount_small_tmpfs(path: Path, size: str):
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not root'})")


@pytest.fixture()
def small_disk(tmp_path):
    """A 2 MB filesystem (a tmpfs: needs root, as CI runs; skipped otherwise with the reason)."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a small tmpfs, which needs root")
    disk = tmp_path / "disk"
    _mount_small_tmpfs(disk, "2m")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave: int) -> None:
    """Fill the filesystem to within `leave` bytes."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "filler", "wb") as handle:
        handle.write(b"\0" * max(0, free - leave))


def test_a_full_disk_is_one_line_and_leaves_the_old_files(small_disk, tiny_ckpt, msrvtt, capsys):
    out = small_disk / "G"
    argv = ["index", "--checkpoint", tiny_ckpt, "--root", msrvtt, "--collection", "msrvtt10k", "--out", str(out),
            "--quiet"]
    assert main([*argv, "--split", "test"]) == 0
    before = snapshot(out)
    _fill(small_disk, 8192)
    assert main([*argv, "--split", "train", "--append"]) == 2
    line = one_error_line(capsys)
    assert "disk full while writing" in line
    assert snapshot(out) == before and _siblings(out) == []
    train = ["train", "--root", msrvtt, "--collection", "msrvtt10k", "--feature", FEATURE, "--anchors", "none",
             "--out", str(small_disk / "ckpt"), "--epochs", "1", "--batch-size", "16", "--latent-dim", "32",
             "--attn-dim", "16", "--video-gru-hidden", "16", "--video-local-dim", "32", "--quiet"]
    assert main(train) == 2
    assert "disk full while writing" in one_error_line(capsys)
    assert not (small_disk / "ckpt").exists() and _siblings(small_disk / "ckpt") == []


NOBODY = 65534


def _main_as_nobody(argv) -> tuple:
    """`main(argv)` in a forked child that has dropped to user nobody: (exit code, stderr). A fork,
    not a new process: this Python's own files may not be readable by nobody."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(argv)
            os.write(write, f"{code}\n{err.getvalue()}".encode())
        except BaseException as error:  # noqa: BLE001 - reported to the parent
            os.write(write, f"99\n{type(error).__name__}: {error}".encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as handle:
        code, _, err = handle.read().partition("\n")
    os.waitpid(pid, 0)
    return int(code), err


def test_permission_denied_is_reported_as_such(small_gallery, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("run as root, the test drops to user nobody to meet a permission it lacks")
    shared = Path(tempfile.mkdtemp(prefix="cvr-perm-"))
    try:
        os.chmod(shared, 0o755)
        private = shared / "private"
        shutil.copytree(small_gallery, private / "G")
        os.chmod(private, 0o700)  # root's: nobody cannot enter it
        queries = shared / "queries.txt"
        queries.write_text("a dog\n")
        readable = shared / "readable.txt"
        readable.write_text("a dog\n")
        os.chmod(queries, 0o600)
        writable = shared / "writable"
        writable.mkdir(mode=0o777)
        os.chmod(writable, 0o777)
        cases = [(["search", "--gallery", str(private / "G"), "--checkpoint", str(private), "--queries", str(readable)],
                  f"{private / 'G'}: permission denied"),
                 (["search", "--gallery", str(private / "G"), "--checkpoint", str(private), "--queries", str(queries)],
                  "Permission denied"),
                 (["index", "--checkpoint", str(private / "ckpt"), "--root", str(shared), "--collection", "c",
                   "--out", str(writable / "out")], "permission denied")]
        for argv, needle in cases:
            code, err = _main_as_nobody(argv)
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and needle in lines[0], err
    finally:
        shutil.rmtree(shared)


# ---------------------------------------------------------------------------------------------
# 4 (integrity) and 8: tampered files of every kind, `cvr doctor`, `cvr gallery info`


def _flip_a_byte(path: Path, offset: int = -1) -> None:
    """Change one byte, keeping the size (and then the mtime, so only a rehash can tell)."""
    status = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))


def test_a_tampered_gallery_is_refused_and_the_doctor_always_rehashes(small_gallery, capsys):
    assert main(["doctor", small_gallery]) == 0
    assert "PROBLEM" not in capsys.readouterr().out
    Gallery.load(small_gallery)  # stamps it verified
    embeddings = Path(small_gallery) / "embeddings.safetensors"
    _flip_a_byte(embeddings)
    # Same size, inode and mtime: the stamp still vouches for it, so a plain load trusts it...
    Gallery.load(small_gallery)
    # ...but the doctor rehashes, and any rewrite (new inode or mtime) is caught at load.
    assert main(["doctor", small_gallery]) == 2
    out, err = capsys.readouterr()
    assert "embeddings.safetensors: checksum mismatch" in out and err.count("\n") == 1
    data = embeddings.read_bytes()
    embeddings.unlink()
    embeddings.write_bytes(data)
    with pytest.raises(CVRError, match="embeddings.safetensors: checksum mismatch"):
        Gallery.load(small_gallery)


def test_a_tampered_checkpoint_is_refused(tiny_ckpt, tmp_path, capsys):
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, target)
    weights = target / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    from engine.checkpoint import load_checkpoint

    with pytest.raises(CVRError, match="model.safetensors: checksum mismatch"):
        load_checkpoint(str(target))
    assert main(["doctor", str(target)]) == 2
    assert "checksum mismatch" in capsys.readouterr().out


def test_a_tampered_anchor_store_and_anchor_cache_entry_are_caught(tmp_path, caplog):
    from engine.anchor_store import read_anchor_store
    from engine.bigfile import BigFileWriter
    from engine.portable import AnchorCache

    store = tmp_path / "store"
    with BigFileWriter(store, 6) as writer:
        writer.add(["a#0", "b#0"], np.arange(12, dtype=np.float32).reshape(2, 6))
        meta = {"format": "cvr-sdgm/anchors/1", "regions": 3, "dim": 2, "noise": _noise()}
        from engine.anchor_store import _sealed_meta

        writer.add_file("anchor_meta.json", _sealed_meta(meta))
    assert read_anchor_store(store)[0] == ["a#0", "b#0"]
    feature = store / "feature.bin"
    data = bytearray(feature.read_bytes())
    data[0] ^= 0x40
    feature.unlink()
    feature.write_bytes(bytes(data))
    with pytest.raises(CVRError, match="feature.bin: checksum mismatch.*cvr anchors"):
        read_anchor_store(store)

    cache = AnchorCache(tmp_path / "cache")
    image = np.full((4, 4, 3), 7, np.uint8)
    cache.put("k1", image)
    assert np.array_equal(cache.get("k1"), image)
    cache._path("k2").parent.mkdir(parents=True, exist_ok=True)
    os.replace(cache._path("k1"), cache._path("k2"))  # an entry filed under another key
    assert cache.get("k2") is None and "not this prompt's" in caplog.text


def _noise():
    from engine.portable import NOISE_SCHEME

    return NOISE_SCHEME


def test_gallery_info_shows_format_model_sizes_and_sources(small_gallery, capsys):
    assert main(["gallery", "info", small_gallery, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    manifest = json.loads((Path(small_gallery) / "manifest.json").read_text())
    assert info["videos"] == manifest["count"] and info["checkpoint"]["id"] == manifest["checkpoint"]["id"]
    assert info["sealed"] and info["sources"][0]["split"] == "test" and info["bytes_on_disk"] > 0
    assert main(["gallery", "info", small_gallery]) == 0
    assert "| videos |" in capsys.readouterr().out


def test_doctor_reports_and_cleans_a_dead_writers_leftovers(small_gallery, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    parent, name = os.path.split(small_gallery)
    leftover = Path(parent, f".{name}.tmp-{dead.pid}-zz")
    leftover.mkdir()
    assert main(["doctor", small_gallery]) == 2
    assert "left by a killed writer" in capsys.readouterr().out
    assert main(["doctor", "--clean", small_gallery]) == 0
    assert not leftover.exists()


def test_data_summary_checks_what_train_and_index_check(msrvtt, tmp_path, capsys):
    root = tmp_path / "root"
    shutil.copytree(msrvtt, root)
    feature = root / "msrvtt10k" / "FeatureData" / FEATURE / "feature.bin"
    rows = np.fromfile(feature, dtype=np.float32)
    rows[5] = np.nan
    rows.tofile(feature)
    argv = ["data", "summary", "--root", str(root), "--collection", "msrvtt10k", "--feature", FEATURE]
    assert main(argv) == 2
    assert "NaN or infinite" in one_error_line(capsys)


# ---------------------------------------------------------------------------------------------
# Review findings: same-kind outputs, pid reuse, threads, damaged entries, tracebacks


def test_outputs_beside_and_inside_are_not_lost(tiny_ckpt, tmp_path, capsys):
    from engine import outputs

    # A distill --out folder holds its students' lock files: a rerun may still write it.
    students = tmp_path / "students"
    (students / "4step").mkdir(parents=True)
    from engine.anchors import CONFIG_FILE, FORMAT

    (students / "4step" / CONFIG_FILE).write_text(json.dumps({"format": FORMAT}))
    (students / "4step.lock").write_text("")
    outputs.claim(students, "students", "cvr generator distill")  # no error: all its own
    # `cvr train --out CKPT` over a checkpoint holding its export would delete the export.
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    (ckpt / "onnx").mkdir()
    (ckpt / "onnx" / "graph.onnx").write_bytes(b"exported")
    argv = ["train", "--root", str(tmp_path), "--collection", "c", "--feature", FEATURE, "--anchors", "none",
            "--out", str(ckpt)]
    assert main(argv) == 2
    assert "only what `cvr train` writes" in one_error_line(capsys)
    assert (ckpt / "onnx" / "graph.onnx").read_bytes() == b"exported"


def test_a_leftover_of_a_reused_pid_is_still_recovered(small_gallery):
    """In a container every run may have the same pid: a folder moved aside under this very pid
    (not in flight here) is a leftover, and goes back."""
    parent, name = os.path.split(small_gallery)
    aside = os.path.join(parent, f".{name}.old-{os.getpid()}-zz")
    os.rename(small_gallery, aside)
    assert files.recover(small_gallery) == [aside]
    assert len(Gallery.load(small_gallery)) > 0


def test_a_second_thread_waits_for_the_lock_then_is_refused(tmp_path):
    import threading
    import time

    target = str(tmp_path / "T")
    held, release = threading.Event(), threading.Event()

    def hold():
        with locks.lock(target):
            held.set()
            release.wait(10)
    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    start = time.monotonic()
    with pytest.raises(locks.LockedError, match="this process"):
        with locks.lock(target, timeout=0.3):
            pass
    assert time.monotonic() - start < 2
    release.set()
    holder.join()


def test_a_truncated_anchor_cache_entry_is_drawn_again(tmp_path, caplog):
    from engine.portable import AnchorCache

    cache = AnchorCache(tmp_path / "cache")
    cache.put("k", np.zeros((4, 4, 3), np.uint8))
    path = cache._path("k")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert cache.get("k") is None and "drawing it again" in caplog.text


def test_bad_input_deep_in_a_command_is_one_line(msrvtt, tmp_path, capsys):
    some_dir = tmp_path / "g"
    some_dir.mkdir()
    argv = ["anchors", "--generator", str(some_dir), "--root", msrvtt, "--collection", "msrvtt10k", "--split",
            "tset", "--out", str(tmp_path / "store")]
    assert main(argv) == 2
    assert "split must be one of" in one_error_line(capsys)
    store = tmp_path / "bad_store"
    store.mkdir()
    (store / "anchor_meta.json").write_text(json.dumps({"format": "cvr-sdgm/anchors/1", "files": ["feature.bin"]}))
    assert main(["doctor", str(store)]) == 2
    assert "malformed" in capsys.readouterr().out
