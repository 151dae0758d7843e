"""`cvr serve`: the HTTP API and web page over one gallery (engine/serve/)."""
from __future__ import annotations

from engine.cli.common import positive, require
from engine.retriever import BACKENDS


def add(sub) -> None:
    serve = sub.add_parser("serve", help="serve a gallery over HTTP: JSON API, web page, metrics")
    serve.add_argument("--gallery", required=True)
    serve.add_argument("--checkpoint", required=True)
    serve.add_argument("--backend", default="torch", choices=BACKENDS)
    serve.add_argument("--export", default=None, help="export folder for onnxruntime / tensorrt "
                                                      "(default: made or reused in CHECKPOINT/onnx)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1; another needs --api-key-file)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--api-key-file", default=None,
                       help="a file holding the API key the write routes need (and any non-loopback --host)")
    serve.add_argument("--read-only", action="store_true", help="no write routes (indexing, deleting)")
    serve.add_argument("--max-batch", type=positive("--max-batch"), default=32,
                       help="queries coalesced into one model batch (default 32)")
    serve.add_argument("--max-wait-ms", type=float, default=5.0,
                       help="how long the first request of a batch waits for others (default 5)")
    serve.add_argument("--max-queue", type=positive("--max-queue"), default=256,
                       help="requests waiting at most; past it the server answers 503 (default 256)")
    serve.add_argument("--timeout-s", type=float, default=30.0, help="a request's deadline (504 past it)")
    serve.add_argument("--anchor-cache", default=None,
                       help="folder for the anchor cache (default: GALLERY's sibling GALLERY.anchors)")
    serve.add_argument("--generator", default=None)
    serve.add_argument("--steps", type=positive("--steps"), default=None)
    serve.add_argument("--device", default="cpu")
    serve.add_argument("--threads", type=positive("--threads"), default=1,
                       help="CPU threads of the query path (default 1)")
    serve.set_defaults(func=handler)


def handler(args) -> int:
    import os

    from engine.serve.state import ServeConfig, read_api_key

    require("serve", "fastapi", "uvicorn", "prometheus_client")
    config = ServeConfig(gallery=os.path.abspath(args.gallery), checkpoint=args.checkpoint, backend=args.backend,
                         host=args.host, port=args.port, api_key=read_api_key(args.api_key_file),
                         read_only=args.read_only, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                         max_queue=args.max_queue, timeout_s=args.timeout_s, device=args.device,
                         export_dir=args.export, generator=args.generator, steps=args.steps, threads=args.threads,
                         anchor_cache=args.anchor_cache or os.path.abspath(args.gallery).rstrip("/") + ".anchors")
    config.check()  # before any model loads
    run(config, args)
    return 0


def run(config, args) -> None:
    """Load the models once, then serve until SIGTERM / SIGINT (uvicorn drains requests in flight)."""
    import os

    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(config.threads))  # per worker thread: see README
    import uvicorn

    from engine.cli.search import open_retriever
    from engine.retriever import check_backend
    from engine.serve.app import create_app

    check_backend(config.backend, config.device)
    retriever = open_retriever(args, gallery=config.gallery, anchor_cache=config.anchor_cache)
    app = create_app(config, retriever)
    print(f"cvr serve: {len(retriever.gallery)} videos on http://{config.host}:{config.port}/ "
          f"(API docs at /docs; {config.backend} backend)", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=30)
