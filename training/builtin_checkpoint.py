"""Reproduce the shipped built-in retrieval checkpoint (engine/weights/retrieval/builtin/).

    python -m training.builtin_checkpoint [--out DIR] [--work DIR]

From scratch, with the `cvr` commands a user would type: the built-in data set (seed 0, 600 videos),
an anchor for every caption from the shipped 4-step student (the demo's fair query protocol), the
full CVR-SDGM model at the small widths below with float16 weights, its test-split metrics; then the
checkpoint folder is copied into --out in one atomic swap. The working data stays in --work.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from engine import files, paths
from engine.checkpoint import CONFIG, LOG, WEIGHTS
from engine.errors import CVRError

SHIPPED = paths.WEIGHTS / "retrieval" / "builtin"
SEED = 0
VIDEOS = 600
EPOCHS = 30  # an upper bound: early stopping on validation may end it (2026-12-04: epoch 22, best 17)
# model.safetensors in float16 is about 7.7 MB at these widths (the default widths: 45 MB); the
# 2048-d frame and region inputs dominate, so the GRU and the region projection are kept narrow.
WIDTHS = {"latent-dim": 512, "attn-dim": 128, "video-gru-hidden": 128, "video-local-dim": 256}
MAX_BYTES = 10_000_000  # the shipped weights' budget


class BuiltinCheckpointError(CVRError):
    """A step of the reproduction failed, or its result does not fit the budget (one line)."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.builtin_checkpoint", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(SHIPPED), help=f"where the checkpoint goes (default: {SHIPPED})")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "cvr_builtin_checkpoint"),
                        help="working folder for the data, anchors and the trained checkpoint (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2,
                        help="anchor worker processes of one thread each (default 2, as `cvr demo`)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return _reproduce(args)
    except CVRError as error:
        print(f"builtin_checkpoint: error: {error}".splitlines()[0], file=sys.stderr)
        return 2


def _reproduce(args) -> int:
    work = os.path.abspath(args.work)
    data, anchors, trained = (os.path.join(work, name) for name in ("data", "anchors_student4", "builtin"))
    common = ["--root", data, "--collection", "synth"]
    quiet = ["--quiet"] if args.quiet else []
    _step("data", ["data", "synth", "--root", data, "--seed", str(SEED), "--videos", str(VIDEOS), "--threads", "1",
                   *quiet])
    _step("anchors", _anchors_argv(common, anchors, os.path.join(work, "anchor_cache"), args.workers, quiet))
    seconds = _step("train", _train_argv(common, anchors, trained, quiet))
    _step("evaluate", ["evaluate", "--checkpoint", trained, *common, "--split", "test", "--anchors", anchors,
                       "--out", os.path.join(work, "builtin_test")])
    size = _check_size(trained)
    ship(trained, args.out)
    print(f"trained in {seconds:.0f} s; model.safetensors {size / 1e6:.2f} MB; shipped to {args.out}", flush=True)
    return 0


def _anchors_argv(common: list, out: str, cache: str, workers: int, quiet: list) -> list:
    from engine.cli.demo import SHIPPED_STUDENT

    # The demo's protocol: one anchor per caption of every split, drawn from the caption alone.
    return ["anchors", "--generator", SHIPPED_STUDENT, *common, "--split", "train,val,test", "--prompt", "query",
            "--seed", str(SEED), "--out", out, "--cache", cache, "--workers", str(workers), *quiet]


def _train_argv(common: list, anchors: str, out: str, quiet: list) -> list:
    widths = [item for name, value in WIDTHS.items() for item in (f"--{name}", str(value))]
    return ["train", *common, "--anchors", anchors, "--out", out, "--epochs", str(EPOCHS), "--seed", str(SEED),
            "--threads", "1", *widths, "--weights-dtype", "float16", *quiet]


def _step(name: str, argv: list) -> float:
    """`cvr <argv>`; its wall time in seconds. A failed step stops the reproduction."""
    from engine.cli import main as cvr

    print(f"== {name}: cvr {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    if code := cvr(argv):
        raise BuiltinCheckpointError(f"step {name} failed (exit {code}): see its message above")
    seconds = time.perf_counter() - start
    print(f"== {name}: {seconds:.0f} s", flush=True)
    return seconds


def _check_size(checkpoint: str) -> int:
    size = os.path.getsize(os.path.join(checkpoint, WEIGHTS))
    if size > MAX_BYTES:
        raise BuiltinCheckpointError(f"{checkpoint}: {WEIGHTS} is {size} bytes, over the {MAX_BYTES}-byte budget")
    return size


def ship(checkpoint: str, out: str) -> None:
    """Copy a checkpoint's own three files into `out`, swapped into place in one step (a reader sees
    the old checkpoint or the new one); the byte copy keeps its id. Refuses to replace anything but
    a checkpoint."""
    from engine.outputs import claim

    claim(out, "bare checkpoint", "python -m training.builtin_checkpoint")
    with files.staged_folder(out) as staging:
        for name in (WEIGHTS, CONFIG, LOG):
            shutil.copyfile(os.path.join(checkpoint, name), os.path.join(staging, name))
            files.fsync_file(os.path.join(staging, name))


if __name__ == "__main__":
    sys.exit(main())
