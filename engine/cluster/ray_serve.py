"""`cvr serve --ray [ADDRESS] --replicas R --shards DIR`: the HTTP API and web page of `cvr serve`
as a Ray Serve deployment in front of the shard actors.

Each replica loads the query pipeline once (text encoder, generator, ResNet-50, query tower) and
runs the very app of engine/serve/app.py over a ShardedRetriever whose fan-out is the shard actors
(engine/cluster/ray_shards.py): same routes, same answers, same page. Requests coalesce through
Ray Serve's `@serve.batch` (instead of the in-process micro-batcher) into one model call per
batch on the replica's model thread; the batch's embeddings then go to every shard at once.
Replicas are a fixed count, or autoscale between --replicas and --max-replicas on the requests in
flight. A shard set is written by `cvr gallery shard` (or `cvr index --ray --shards`), so this
server is read-only: its write routes answer 403.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import sys

from engine.cluster.ray_shards import NAMESPACE, ClusterError, require_ray

APP_NAME = "cvr-sdgm"
DEPLOYMENT = "cvr-query"


class ServeBatch:
    """The app's batcher interface (engine/serve/batcher.py) over a replica's @serve.batch method."""

    depth = 0  # Ray Serve queues requests in its router (and answers 503 past max_queued_requests)

    def __init__(self, batched):
        self.batched = batched

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def submit(self, texts: list, key: tuple, timeout: float):
        answer = await asyncio.wait_for(self.batched((texts, key)), timeout)
        if isinstance(answer, Exception):
            raise answer
        return answer


def _replica_class():
    """The deployment class (built lazily: Ray Serve is imported only by `--ray`)."""
    from ray import serve

    @serve.ingress()
    class QueryReplica:
        def __init__(self, config: dict, shard_folder: str, shard_names: list):
            from engine.cli.common import set_threads
            from engine.cluster.ray_shards import RayShards
            from engine.cluster.scatter import ShardedRetriever
            from engine.retriever import open_pipeline
            from engine.serve.app import create_app
            from engine.serve.state import ServeConfig

            config = ServeConfig(**config)
            os.environ.setdefault("OPENBLAS_NUM_THREADS", str(config.threads))
            set_threads(config.threads)
            pipeline = open_pipeline(config.backend, config.checkpoint, config.device, config.generator,
                                     config.steps, config.anchor_cache, None, config.export_dir, config.threads)
            shards = RayShards.attach(shard_names)
            shards.timeout = config.timeout_s  # a hung shard is a 503 for this batch, not a stuck replica
            self.retriever = ShardedRetriever(pipeline, shard_folder, shards, config.backend, config.anchor_cache)
            self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cvr-model")
            self.answer.set_max_batch_size(config.max_batch)
            self.answer.set_batch_wait_timeout_s(config.max_wait_ms / 1000.0)
            self.run = self.metrics = None

            def make_batcher(run, metrics):
                self.run, self.metrics = run, metrics
                return ServeBatch(self.answer)

            self.asgi = create_app(config, self.retriever, make_batcher)

        def __serve_build_asgi_app__(self):
            return self.asgi

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
        async def answer(self, requests: list) -> list:
            from engine.serve.batcher import answer_grouped

            return await answer_grouped(requests, self.run, self.executor, self.metrics.batch_size.observe)

    return QueryReplica


def deploy(config, shard_folder: str, shard_names: list, replicas: int = 1, max_replicas: int | None = None,
           replica_cpus: float = 1.0, gpus: float = 0.0) -> None:
    """Start Ray Serve's HTTP proxy on config.host:config.port and the query deployment; returns
    once the replicas answer."""
    ray = require_ray()
    from ray import serve

    if not ray.is_initialized():
        raise RuntimeError("connect to Ray first (engine.cluster.ray_shards.connect)")
    running = sorted(serve.status().applications)
    if running:
        # One Serve HTTP proxy per cluster: another app at "/" would be replaced, and new
        # http_options (host, port) would be ignored.
        raise ClusterError(f"Ray Serve on this cluster already runs {', '.join(running)}: stop it "
                           "(`serve shutdown`) or use another cluster")
    options = {"name": DEPLOYMENT, "max_ongoing_requests": max(2 * config.max_batch, 8),
               "max_queued_requests": config.max_queue,
               "ray_actor_options": {"num_cpus": replica_cpus, "num_gpus": gpus,
                                     "runtime_env": {"env_vars": {"OPENBLAS_NUM_THREADS": str(config.threads),
                                                                  "OMP_NUM_THREADS": str(config.threads)}}},
               "graceful_shutdown_timeout_s": 30}
    if max_replicas and max_replicas > replicas:
        # Scale on the requests in flight per replica: a full batch each before another starts.
        options["autoscaling_config"] = {"min_replicas": replicas, "max_replicas": max_replicas,
                                         "target_ongoing_requests": config.max_batch, "upscale_delay_s": 10,
                                         "downscale_delay_s": 120}
    else:
        options["num_replicas"] = replicas
    deployment = serve.deployment(_replica_class()).options(**options)
    serve.start(http_options={"host": config.host, "port": config.port,
                              "request_timeout_s": config.timeout_s + 5})
    try:
        serve.run(deployment.bind(dataclasses.asdict(config), os.path.abspath(shard_folder), list(shard_names)),
                  name=APP_NAME, route_prefix="/", blocking=False)
    except BaseException:
        undeploy()  # a replica that cannot start leaves no half-deployed app behind
        raise


def undeploy() -> None:
    """Delete this engine's Serve app, then Serve itself when nothing else runs on it."""
    ray = require_ray()
    if not ray.is_initialized():
        return
    from ray import serve

    try:
        if APP_NAME in serve.status().applications:
            serve.delete(APP_NAME)
        if not serve.status().applications:
            serve.shutdown()
    except Exception as error:  # noqa: BLE001 - a Serve already gone is what was asked for
        print(f"cvr serve: stopping Ray Serve: {str(error).splitlines()[0]}", file=sys.stderr)


__all__ = ["APP_NAME", "DEPLOYMENT", "NAMESPACE", "ServeBatch", "deploy", "undeploy"]
