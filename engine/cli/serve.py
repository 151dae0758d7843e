"""`cvr serve`: the HTTP API and web page over one gallery (engine/serve/), or over a shard set
(`--shards DIR`: in this process, or on Ray with `--ray [ADDRESS] --replicas R`, engine/cluster/)."""
from __future__ import annotations

from engine.cli.common import CLIError, positive, require
from engine.retriever import BACKENDS


def add(sub) -> None:
    serve = sub.add_parser("serve", help="serve a gallery over HTTP: JSON API, web page, metrics")
    serve.add_argument("--gallery", default=None, help="the gallery to serve (or --shards)")
    serve.add_argument("--shards", default=None, metavar="DIR",
                       help="a shard set (`cvr gallery shard`) to serve by scatter-gather, read-only")
    serve.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                       help="run on Ray Serve, each shard in a Ray actor: a local Ray (no ADDRESS), 'auto' "
                            "(the cluster of `ray start`) or a cluster address")
    serve.add_argument("--replicas", type=positive("--replicas"), default=1,
                       help="query replicas on Ray (default 1); with --max-replicas the least of an autoscaling range")
    serve.add_argument("--max-replicas", type=positive("--max-replicas"), default=None,
                       help="autoscale the query replicas up to this many on the requests in flight")
    serve.add_argument("--shard-cpus", type=_non_negative, default=None,
                       help="logical CPUs each shard actor reserves (default: 1, less on a small cluster)")
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
    if (args.gallery is None) == (args.shards is None):
        raise CLIError("give either --gallery G or --shards DIR")
    if args.ray is not None and args.shards is None:
        raise CLIError("--ray serves a shard set: split the gallery with `cvr gallery shard G --shards N --out DIR` "
                       "and pass --shards DIR")
    if args.ray is None and (args.replicas != 1 or args.max_replicas):
        raise CLIError("--replicas and --max-replicas need --ray")
    if args.max_replicas is not None and args.max_replicas < args.replicas:
        raise CLIError("--max-replicas must be at least --replicas")
    folder = os.path.abspath(args.gallery or args.shards)
    if args.shards:
        from engine.cluster.shardset import read_shardset

        read_shardset(folder)  # a bad folder is refused before any model loads
    config = ServeConfig(gallery=folder, checkpoint=os.path.abspath(args.checkpoint), backend=args.backend,
                         host=args.host, port=args.port, api_key=read_api_key(args.api_key_file),
                         read_only=args.read_only or args.shards is not None, max_batch=args.max_batch,
                         max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, timeout_s=args.timeout_s,
                         device=args.device, export_dir=args.export, generator=args.generator, steps=args.steps,
                         threads=args.threads, anchor_cache=args.anchor_cache or folder.rstrip("/") + ".anchors")
    config.check()  # before any model loads
    if args.ray is not None:
        run_on_ray(config, args)
    else:
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
    if args.shards:
        retriever = _local_shards(config, args)
        where = f"{len(retriever.gallery)} videos in {len(retriever.shards.searchers)} shards"
    else:
        retriever = open_retriever(args, gallery=config.gallery, anchor_cache=config.anchor_cache)
        where = f"{len(retriever.gallery)} videos"
    app = create_app(config, retriever)
    print(f"cvr serve: {where} on http://{config.host}:{config.port}/ "
          f"(API docs at /docs; {config.backend} backend)", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=30)


def _local_shards(config, args):
    """A ShardedRetriever over every shard of the set, in this process."""
    from engine.cli.common import set_threads
    from engine.cluster.scatter import LocalShards, ShardedRetriever
    from engine.retriever import open_pipeline

    export_dir = _export_dir(config, args)
    set_threads(config.threads)
    pipeline = open_pipeline(config.backend, config.checkpoint, config.device, config.generator, config.steps,
                             config.anchor_cache, None, export_dir, config.threads)
    shards = LocalShards.open(config.gallery, config.checkpoint, threads=config.threads)
    return ShardedRetriever(pipeline, config.gallery, shards, config.backend, config.anchor_cache)


def _export_dir(config, args) -> str | None:
    from engine.cli.search import _default_export
    from engine.retriever import EXPORTED

    if config.backend in EXPORTED and config.export_dir is None:
        return _default_export(args)
    return config.export_dir


def run_on_ray(config, args) -> None:
    """Shard actors, then the Ray Serve deployment in front of them; serve until SIGTERM / SIGINT,
    then stop Serve, the actors and (when this command started it) Ray."""
    import dataclasses
    import signal
    import threading

    from engine.cli.common import require
    from engine.cluster import ray_serve
    from engine.cluster.ray_shards import RayShards, cluster_gpus, connect
    from engine.retriever import check_backend

    require("cluster", "ray")
    check_backend(config.backend, config.device)
    config = dataclasses.replace(config, export_dir=_export_dir(config, args))
    ray = connect(args.ray)
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs handlers of its own
        signal.signal(number, lambda *_: stop.set())
    shards, deployed = None, False
    try:
        shards = RayShards.start(config.gallery, config.checkpoint, cpus=args.shard_cpus, threads=1)
        top_replicas = args.max_replicas or args.replicas
        left = float(ray.cluster_resources().get("CPU", 1.0)) - len(shards.names) * shards.cpus
        replica_cpus = max(0.1, min(1.0, round(left / top_replicas, 2)))  # what the shards leave, shared
        gpus = min(1.0, cluster_gpus() / top_replicas) if config.device.startswith("cuda") else 0.0
        ray_serve.deploy(config, config.gallery, shards.names, args.replicas, args.max_replicas, replica_cpus, gpus)
        deployed = True
        print(f"cvr serve: {len(shards.names)} shards on http://{config.host}:{config.port}/ (Ray Serve, "
              f"{args.replicas}{'-' + str(args.max_replicas) if args.max_replicas else ''} replicas; "
              f"API docs at /docs)", flush=True)
        stop.wait()
    except ray.exceptions.RayError as error:
        from engine.cluster.ray_shards import cluster_error

        raise cluster_error(error, "Ray Serve failed") from None
    except RuntimeError as error:  # Serve's own "deploying the application failed"
        from engine.cluster.ray_shards import ClusterError

        raise ClusterError(f"Ray Serve: {str(error).strip().splitlines()[0]}") from None
    finally:
        if deployed:
            ray_serve.undeploy()
        if shards is not None:
            shards.close()
        if args.ray == "local":
            ray.shutdown()


def _non_negative(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value
