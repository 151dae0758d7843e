"""Issue 13's findings as commands, against any checkout (as root: it mounts a tmpfs and uses strace):

    python tests/findings_issue13.py REPO WORKDIR

Each line says FIXED or BROKEN with what was seen. Not a test module (pytest does not collect it):
it reproduces the findings on old checkouts too, where tests/test_faults.py cannot even import.
"""
import json
import os
import shutil
import subprocess
import sys

REPO, WORK = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
PY = sys.executable
ENV = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OPENBLAS_NUM_THREADS="1")
CVR = [PY, "-c", "import sys; from engine.cli import main; sys.exit(main(sys.argv[1:]))"]
shutil.rmtree(WORK, ignore_errors=True)
os.makedirs(WORK)


def cvr(*argv, **kw):
    return subprocess.run([*CVR, *argv], env=ENV, capture_output=True, text=True, **kw)


def report(name, fixed, seen):
    print(f"{'FIXED ' if fixed else 'BROKEN'} {name}: {seen}")


def last(done) -> str:
    return f"exit {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1][:140]}"


def one_line(done):
    lines = done.stderr.strip().splitlines()
    return done.returncode != 0 and len(lines) == 1 and "Traceback" not in done.stderr


sys.path.insert(0, os.path.join(REPO, "tests"))
from msrvtt_fixture import write_msrvtt_fixture  # noqa: E402

ROOT = os.path.join(WORK, "data")
write_msrvtt_fixture(ROOT)
TINY = ["--feature", "resnext101-resnet152", "--epochs", "1", "--batch-size", "16", "--latent-dim", "32",
        "--attn-dim", "16", "--video-gru-hidden", "16", "--video-local-dim", "32", "--quiet"]
CKPT = os.path.join(WORK, "ckpt")
assert cvr("train", "--root", ROOT, "--collection", "msrvtt10k", "--out", CKPT, *TINY).returncode == 0
DATA = ["--root", ROOT, "--collection", "msrvtt10k"]

# 1. train --out over a folder that is not a checkpoint
x = os.path.join(WORK, "X")
os.makedirs(os.path.join(x, "sub"))
open(os.path.join(x, "notes.txt"), "w").write("keep\n")
done = cvr("train", *DATA, "--out", x, "--anchors", "none", *TINY)
kept = os.path.exists(os.path.join(x, "notes.txt"))
report("1 train --out deletes a foreign folder", kept and done.returncode == 2,
       f"exit {done.returncode}, notes.txt {'kept' if kept else 'DELETED'}")

# 2. two concurrent appends
g = os.path.join(WORK, "G")
assert cvr("index", "--checkpoint", CKPT, *DATA, "--split", "test", "--out", g, "--quiet").returncode == 0
# Each racer's rename is held up 1.5 s (strace), so that both read the gallery before either writes.
SLOW = ["strace", "-f", "-o", "/dev/null", "-e", "trace=rename,renameat2", "-e",
        "inject=rename,renameat2:delay_enter=1500000"]
racers = [subprocess.Popen([*SLOW, *CVR, "index", "--checkpoint", CKPT, *DATA, "--split", s, "--out", g, "--append",
                            "--quiet"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
          for s in ("train", "val")]
codes = [r.wait() for r in racers]
errors = [r.stderr.read().decode().strip().splitlines()[-1:] for r in racers]
splits = sorted(s["split"] for s in json.load(open(os.path.join(g, "manifest.json")))["sources"])
report("2 concurrent appends", splits == ["test", "train", "val"], f"exits {codes}, sources {splits} {errors}")

# 3. kill between the two renames of a swap (strace fault injection, as the issue did)
g3 = os.path.join(WORK, "G3")
assert cvr("index", "--checkpoint", CKPT, *DATA, "--split", "test", "--out", g3, "--quiet").returncode == 0
env = dict(ENV, CVR_RENAME_EXCHANGE="0")  # the two-rename path (ignored by the old code, which has only it)
subprocess.run(["strace", "-f", "-o", "/dev/null", "-e", "trace=rename", "-e",
                "inject=rename:error=EIO:signal=SIGKILL:when=2", *CVR, "index", "--checkpoint", CKPT, *DATA,
                "--split", "val", "--out", g3, "--append", "--quiet"], env=env, capture_output=True)
after_kill = os.path.isdir(g3)
done = cvr("index", "--checkpoint", CKPT, *DATA, "--split", "val", "--out", g3, "--append", "--quiet")
report("3 kill between renames", done.returncode == 0 and os.path.isdir(g3),
       f"gallery at its path after the kill: {after_kill}; next --append exit {done.returncode} "
       f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")

# 4. NaN weights
nan = os.path.join(WORK, "nan_ckpt")
code = ("import sys, torch; from engine.checkpoint import load_checkpoint, save_checkpoint\n"
        "m = load_checkpoint(sys.argv[1])\n"
        "with torch.no_grad(): next(p for n, p in m.named_parameters() if n.startswith('query')).fill_(float('nan'))\n"
        "save_checkpoint(m, sys.argv[2])")
assert subprocess.run([PY, "-c", code, CKPT, nan], env=ENV).returncode == 0
gal_nan = os.path.join(WORK, "Gnan")
index = cvr("index", "--checkpoint", nan, *DATA, "--split", "test", "--out", gal_nan, "--quiet", "--feature",
            "resnext101-resnet152")
search = cvr("search", "--gallery", gal_nan, "--checkpoint", nan, "-k", "2", "a dog", "--json")
silent = any(d.returncode == 0 and "NaN" in d.stdout for d in (index, search))
report("4 NaN weights", not silent and one_line(index) and "NaN" in index.stderr,
       f"index exit {index.returncode} ({index.stderr.strip()[-90:]}); search exit {search.returncode}, "
       f"NaN printed: {'NaN' in search.stdout}")

# 5a. config fields of the wrong type
for field, value in (("latent_dim", "32"), ("latent_dim", float("nan")), ("dropout", "x")):
    bad = os.path.join(WORK, f"bad_{field}")
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(CKPT, bad)
    config = json.load(open(os.path.join(bad, "config.json")))
    config.pop("digest", None)  # an unsealed config: its fields are checked one by one
    config["model"][field] = value
    json.dump(config, open(os.path.join(bad, "config.json"), "w"))
    done = cvr("search", "--gallery", g, "--checkpoint", bad, "-k", "2", "a dog")
    report(f"5 config {field}={value!r}", one_line(done) and done.returncode == 2, last(done))

# 5b. full disk while indexing and training
disk = os.path.join(WORK, "disk")
os.makedirs(disk)
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", disk], check=True)
try:
    gd = os.path.join(disk, "G")
    cvr("index", "--checkpoint", CKPT, *DATA, "--split", "test", "--out", gd, "--quiet")
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    open(os.path.join(disk, "filler"), "wb").write(b"\0" * (free - 8192))
    done = cvr("index", "--checkpoint", CKPT, *DATA, "--split", "train", "--out", gd, "--append", "--quiet")
    report("5 full disk while indexing", one_line(done), last(done))
    done = cvr("train", *DATA, "--out", os.path.join(disk, "ck"), *TINY)
    report("5 full disk while training", one_line(done), last(done))
finally:
    subprocess.run(["umount", "-l", disk])

# 5c. an anchor cache pointing at a regular file
regular = os.path.join(WORK, "cache_file")
open(regular, "w").write("x")
student = os.path.join(REPO, "engine/weights/generator/students/4step")
done = cvr("anchors", "--generator", student, *DATA, "--split", "test", "--limit", "2", "--cache", regular,
           "--out", os.path.join(WORK, "store"), "--quiet")
report("5 --anchor-cache is a regular file", one_line(done), last(done))
