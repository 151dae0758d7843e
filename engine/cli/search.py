"""`cvr search`: ranked videos for text queries over a gallery (engine/retriever.py). Imports no
torch for the onnxruntime backend with an export folder."""
from __future__ import annotations

import json
import os
import sys

from engine.cli.common import CLIError, positive
from engine.retriever import BACKENDS, EXPORTED
from engine.search import AUTO_TWO_STAGE_ABOVE, MODES


def add(sub) -> None:
    search = sub.add_parser("search", help="ranked videos for text queries over a gallery")
    search.add_argument("query", nargs="*", help="query text(s); or use --queries FILE")
    search.add_argument("--gallery", required=True)
    search.add_argument("--checkpoint", required=True)
    search.add_argument("-k", type=positive("-k"), default=10, help="videos per query (default 10)")
    search.add_argument("--queries", default=None, help="a UTF-8 file with one query per line")
    search.add_argument("--json", action="store_true", help="print JSON instead of tables")
    search.add_argument("--mode", default="auto", choices=MODES,
                        help=f"gallery search: exhaustive (every video, exact), two-stage (FAISS candidates, exact "
                             f"rerank) or auto (two-stage above {AUTO_TWO_STAGE_ABOVE} videos when the gallery has an "
                             "index; the default)")
    search.add_argument("--candidates", type=positive("--candidates"), default=None, metavar="M",
                        help="two-stage: candidates per query that the exact score reranks (default max(10 k, 100))")
    search.add_argument("--nprobe", type=positive("--nprobe"), default=None,
                        help="two-stage, IVF index: inverted lists probed per query (default: the gallery's, 16)")
    search.add_argument("--ef-search", type=positive("--ef-search"), default=None,
                        help="two-stage, HNSW index: search beam (default: the gallery's, 64)")
    search.add_argument("--where", action="append", default=[], metavar="FILTER",
                        help="only videos whose metadata passes FIELD OP VALUE (OP: = != < <= > >=), e.g. "
                             "'duration>=10' or 'tag=cooking'; repeat for several (all must hold)")
    search.add_argument("--rerank", default=None, metavar="RERANKER",
                        help="rerank each query's top M with a generative reranker (`cvr train-reranker` of this "
                             "--checkpoint); backends torch, triton, onnxruntime")
    search.add_argument("--backend", default="torch", choices=BACKENDS)
    search.add_argument("--export", default=None,
                        help="export folder for onnxruntime / tensorrt (default: made or reused in CHECKPOINT/onnx)")
    search.add_argument("--generator", default=None, help="anchor generator folder (default: the checkpoint's)")
    search.add_argument("--steps", type=positive("--steps"), default=None,
                        help="anchor sampling steps (default: the checkpoint's)")
    search.add_argument("--anchor-cache", default=None, help="folder for the on-disk anchor cache")
    search.add_argument("--device", default="cpu")
    search.add_argument("--threads", type=positive("--threads"), default=1,
                        help="CPU threads of the query path (default 1)")
    search.set_defaults(func=handler)


def read_queries(args) -> list:
    texts = list(args.query)
    if args.queries:
        try:
            with open(args.queries, encoding="utf-8") as handle:
                texts += [line.rstrip("\n") for line in handle if line.strip()]
        except UnicodeDecodeError as error:
            raise CLIError(f"{args.queries}: not UTF-8 text (byte {error.start})") from None
        except OSError as error:
            raise CLIError(f"{args.queries}: cannot read ({error.strerror})") from None
    if not texts:
        raise CLIError("no query: give query text or --queries FILE")
    return texts


def handler(args) -> int:
    from engine.filters import parse_all
    from engine.gallery_format import read_manifest
    from engine.retriever import Retriever, check_backend
    from engine.search import SearchOptions

    texts = Retriever.clean_queries(read_queries(args))  # reject bad input before loading anything
    parse_all(args.where)
    check_backend(args.backend, args.device)
    check_rerank(args)
    count = read_manifest(args.gallery)["count"]
    if args.k > count:
        raise CLIError(f"-k {args.k} is more than the gallery's {count} videos")
    options = SearchOptions(mode=args.mode, candidates=args.candidates, nprobe=args.nprobe,
                            ef_search=args.ef_search)
    options.validate()
    retriever = open_retriever(args)
    results = retriever.search(texts, k=args.k, options=options, where=args.where)
    if args.json:
        print(json.dumps([_as_json(r) for r in results], indent=1, allow_nan=False))  # always valid JSON
        return 0
    media = retriever.gallery.has_media
    for result in results:
        print(f"query: {result.query}")
        if result.anchor:
            print(f"anchor: {result.anchor}")
        print(_table(result, media) if result.hits else "(no video passes the filters)")
        print()
    print(retriever.last_timings.describe())
    if args.backend in EXPORTED:  # onnxruntime-gpu may fall back to the CPU: say what ran
        print(f"{args.backend}: {retriever.pipeline.provider}")
    return 0


def check_rerank(args) -> None:
    """--rerank: a backend that can run it, and a reranker of this checkpoint (one line each), before
    any model loads."""
    folder = getattr(args, "rerank", None)
    if folder is None:
        return
    from engine.checkpoint import checkpoint_id
    from engine.reranking import check_rerank_backend, read_reranker_config

    check_rerank_backend(args.backend)
    base = read_reranker_config(folder)["base"]["id"]
    if base != checkpoint_id(args.checkpoint):
        raise CLIError(f"--rerank {folder}: trained on another checkpoint ({base[:12]}) than --checkpoint "
                       f"{args.checkpoint}: train one with `cvr train-reranker --base {args.checkpoint}`")


def open_retriever(args, gallery: str | None = None, anchor_cache: str | None = None):
    """The Retriever the flags describe (`cvr search`, `cvr serve`): an exported backend's export
    folder made or reused, torch's threads set, the models loaded once."""
    from engine.cli.common import set_threads
    from engine.retriever import Retriever

    export_dir = args.export
    if args.backend in EXPORTED and export_dir is None:
        export_dir = _default_export(args)
    if args.backend not in EXPORTED:
        set_threads(args.threads)
    reranker = getattr(args, "rerank", None)  # `cvr serve` has no --rerank
    if reranker is not None and args.backend == "onnxruntime":
        _default_rerank_export(reranker)
    return Retriever(args.checkpoint, gallery or args.gallery, backend=args.backend, generator=args.generator,
                     device=args.device, steps=args.steps, anchor_cache=anchor_cache or args.anchor_cache,
                     export_dir=export_dir, threads=args.threads, reranker=reranker)


def _as_json(result) -> dict:
    """Today's shape ({query, anchor, results}); each result adds path, segment, segment_score,
    thumbnail (null for a gallery built from feature files)."""
    rows = []
    for rank, ((video, score), detail) in enumerate(zip(result.hits, result.details, strict=True), start=1):
        rows.append({"rank": rank, "video_id": video, "score": score, "path": detail["path"],
                     "segment": detail["segment"], "segment_score": detail["segment_score"],
                     "thumbnail": detail["thumbnail"]})
    return {"query": result.query, "anchor": result.anchor, "results": rows}


def _table(result, media: bool) -> str:
    """One Markdown row per hit: with video files, its path, matching segment and thumbnail."""
    header = "| rank | video id | score |" + (" path | segment (s) | thumbnail |" if media else "")
    lines = [header, "|---:|---|---:|" + ("---|---|---|" if media else "")]
    for rank, ((video, score), detail) in enumerate(zip(result.hits, result.details, strict=True), start=1):
        row = f"| {rank} | {video} | {score:.4f} |"
        if media:
            segment = detail["segment"]
            moment = f"{segment[0]:g}-{segment[1]:g} ({detail['segment_score']:.3f})" if segment else "-"
            row += f" {detail['path'] or '-'} | {moment} | {detail['thumbnail'] or '-'} |"
        lines.append(row)
    return "\n".join(lines)


def _default_export(args) -> str:
    """The export `--backend onnxruntime|tensorrt` runs when no --export is given: made (once) or
    reused in CHECKPOINT/onnx. The command exports; the Retriever only runs export folders."""
    from engine.cli.common import require

    require("export", "onnx", "onnxscript")
    from export.onnx import SEARCH_MODULES, ExportOptions, export_onnx

    out = os.path.join(args.checkpoint, "onnx")

    def log(line: str) -> None:  # the slow first export shows its progress; a reused one says nothing
        if not line.startswith("reused"):
            print(f"cvr search: {line}", file=sys.stderr)
    if args.backend == "tensorrt":
        from engine.backends.tensorrt import tensorrt_unavailable
        from export.tensorrt import TensorRTOptions, export_tensorrt

        if reason := tensorrt_unavailable():
            raise CLIError(reason)
        export_tensorrt(args.checkpoint, out, TensorRTOptions(modules=SEARCH_MODULES, generator=args.generator,
                                                              log=log))
        return out
    return export_onnx(args.checkpoint, out, ExportOptions(modules=SEARCH_MODULES, generator=args.generator,
                                                           log=log)).folder


def _default_rerank_export(reranker: str) -> str:
    """The reranker's denoiser graph that `--backend onnxruntime` runs: reused from RERANKER/onnx
    when it is this reranker's (no torch imported), else exported there once, as the checkpoint's
    export is in CHECKPOINT/onnx."""
    from engine.backends.onnx_rerank import read_rerank_export, rerank_export_dir
    from engine.backends.onnxruntime import ExportedModelError
    from engine.cli.common import require
    from engine.reranking import read_reranker_config

    try:
        read_rerank_export(rerank_export_dir(reranker), read_reranker_config(reranker))
        return rerank_export_dir(reranker)
    except ExportedModelError:
        pass
    require("export", "onnx", "onnxscript")
    from export.graphs.rerank import export_reranker

    return export_reranker(reranker, log=lambda line: print(f"cvr search: {line}", file=sys.stderr)).folder
