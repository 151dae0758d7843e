"""`cvr doctor PATH`: verify a gallery, checkpoint, anchor store or export folder in full, and say
what is wrong and how to fix it.

Unlike a load, which trusts a file its verified stamp vouches for (engine.integrity), the doctor
rehashes every file, checks every manifest's own digest, shapes, format versions, that every
stored number is finite, and looks for what killed writers left beside the folder. Each check is
one line; a failed one carries the error a load would raise, which names the file and the
command that rebuilds it.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine import files, outputs
from engine.errors import CVRError
from engine.integrity import is_sealed, verify_files

FINITE_ROWS = 4096  # rows per finiteness check: no temporary of a whole large array


@dataclass
class Report:
    path: str
    kind: str | None = None
    passed: list = field(default_factory=list)  # one line per check that held
    problems: list = field(default_factory=list)  # one line per check that failed: what, and the fix
    notes: list = field(default_factory=list)  # neither: e.g. written before digests were recorded

    @property
    def healthy(self) -> bool:
        return not self.problems

    def check(self, what: str, run: Callable) -> object:
        """Run one check: its return value, or None with the failure recorded as a problem."""
        try:
            value = run()
        except (CVRError, OSError) as error:
            self.problems.append(f"{what}: {str(error).splitlines()[0]}")
            return None
        self.passed.append(what)
        return value


KINDS = (("gallery", outputs.is_gallery), ("checkpoint", outputs.is_checkpoint),
         ("anchor store", outputs.is_anchor_store), ("export", outputs.is_export))


def diagnose(path: str, clean: bool = False) -> Report:
    """Every check of the folder at `path`; with `clean`, first clean what dead writers left
    beside it (and put back a folder one had moved aside)."""
    path = os.path.abspath(path)
    report = Report(path)
    if clean:
        for handled in files.clean_stale(path):
            report.notes.append(f"cleaned {handled}")
    _leftovers(report)
    if not os.path.isdir(path):
        report.problems.append(f"{path}: no such folder")
        return report
    report.kind = next((kind for kind, recognise in KINDS if recognise(Path(path))), None)
    if report.kind is None:
        report.problems.append(f"{path}: not a gallery, checkpoint, anchor store or export folder (no manifest "
                               "of a known format)")
        return report
    CHECKS[report.kind](path, report)
    return report


def _leftovers(report: Report) -> None:
    """Temporary and moved-aside folders of writers beside the folder: a dead writer's are a
    problem (the next writer, or `cvr doctor --clean`, removes them); a live one's a note."""
    for path, kind, pid, stale in files.leftovers(report.path):
        if not stale:
            report.notes.append(f"{path}: a running writer's (pid {pid}) work")
        elif kind == "old" and not os.path.lexists(report.path):
            report.problems.append(f"{path}: the folder, moved aside by a writer killed mid-swap: run `cvr doctor "
                                   f"--clean {report.path}` (or any load) to put it back")
        else:
            report.problems.append(f"{path}: left by a killed writer: run `cvr doctor --clean {report.path}` (or "
                                   "the next write cleans it)")


def _digests(report: Report, folder: str, digests: dict, hint: str) -> None:
    report.check(f"sha256 of {len(digests)} files", lambda: verify_files(folder, digests, hint, rehash=True))


def _sealed(report: Report, manifest: dict, name: str) -> None:
    if is_sealed(manifest):
        report.passed.append(f"{name} matches its own digest")
    else:
        report.notes.append(f"{name} records no digest of itself (written before digests were recorded); rewrite "
                            "it to have its fields checked")


def _finite(report: Report, what: str, array) -> None:
    def run():
        for start in range(0, array.shape[0], FINITE_ROWS):  # sliced, not reshaped: a gallery's Rows too
            block = np.asarray(array[start : start + FINITE_ROWS])
            block = block.reshape(block.shape[0], -1)
            if not np.isfinite(block).all():
                bad = start + int(np.nonzero(~np.isfinite(block).all(axis=1))[0][0])
                raise CVRError(f"row {bad} holds NaN or infinite values")
    report.check(f"{what} are finite", run)


# ---------------------------------------------------------------------------------------------
# Per kind


def _gallery(path: str, report: Report) -> None:
    from engine.gallery import Gallery
    from engine.gallery_format import REBUILD, read_manifest

    manifest = report.check("manifest (format, version, fields)", lambda: read_manifest(path))
    if manifest is None:
        return
    _sealed(report, manifest, "manifest.json")
    _digests(report, path, manifest["files"], REBUILD)
    gallery = report.check("ids, embeddings and FAISS index load", lambda: Gallery.load(path, verify=False))
    if gallery is None:
        return
    _finite(report, "latent embeddings", gallery.lat)
    _finite(report, "concept embeddings", gallery.con)
    if gallery.faiss_index is not None:
        report.check("FAISS index holds every video",
                     lambda: _same(gallery.faiss_index.ntotal, len(gallery), "index vectors", "videos"))


def _same(found, expected, what_found: str, what_expected: str) -> None:
    if found != expected:
        raise CVRError(f"{found} {what_found} but {expected} {what_expected}")


def _checkpoint(path: str, report: Report) -> None:
    from engine.checkpoint import CONFIG, RETRAIN, load_checkpoint, read_checkpoint_config

    config = report.check("config.json (format, fields)", lambda: read_checkpoint_config(path))
    if config is None:
        return
    _sealed(report, config, CONFIG)
    if config.get("files"):
        _digests(report, path, config["files"], RETRAIN)
    else:
        report.notes.append("config.json records no digest of the weights (written before digests were recorded)")
    # Loading checks every tensor's name, shape and finiteness, and the text encoder.
    report.check("weights load (names, shapes, finite values, text encoder)", lambda: load_checkpoint(path))


def _anchor_store(path: str, report: Report) -> None:
    from engine.anchor_store import DRAW_AGAIN, META_FILE, read_anchor_store

    meta = report.check("anchor_meta.json", lambda: files.read_json(os.path.join(path, META_FILE)))
    if meta is None:
        return
    _sealed(report, meta, META_FILE)
    if meta.get("files"):
        _digests(report, path, meta["files"], DRAW_AGAIN)
    store = report.check("store loads (noise scheme, shapes)", lambda: read_anchor_store(path))
    if store is not None:
        _finite(report, "region features", store[1])


def _export(path: str, report: Report) -> None:
    from engine.backends.onnxruntime import EXPORT_AGAIN, MANIFEST, read_export_manifest

    manifest = report.check("manifest (format, code version, digest, tokenizer files)",
                            lambda: read_export_manifest(path))
    if manifest is None:
        return
    graphs = {entry["file"]: entry["sha256"] for module in manifest["modules"].values()
              for entry in module["files"].values()}
    _digests(report, path, graphs, EXPORT_AGAIN)
    for engines in sorted(os.listdir(path)):
        if engines.startswith("tensorrt-") and os.path.isdir(os.path.join(path, engines)):
            _tensorrt(os.path.join(path, engines), report)
    report.passed.append(f"{MANIFEST} lists {len(manifest['modules'])} modules")


def _tensorrt(folder: str, report: Report) -> None:
    from engine.backends.tensorrt import BUILD_AGAIN, read_engines

    meta = report.check(f"{os.path.basename(folder)}/engines.json", lambda: read_engines(folder))
    if meta is not None:
        _digests(report, folder, {e["file"]: e["sha256"] for e in meta["modules"].values()}, BUILD_AGAIN)


CHECKS = {"gallery": _gallery, "checkpoint": _checkpoint, "anchor store": _anchor_store, "export": _export}
