"""Ray for this engine: connecting to a Ray (one started here, or a cluster's), and the shard
actors: one Ray actor per shard of a set (engine.cluster.scatter.ShardSearcher inside it),
reached as a fan-out that answers like engine.cluster.scatter.LocalShards.

Every node that runs a shard actor reads the shard set and the checkpoint at the same absolute
paths (shared storage, or a copy per node): an actor loads only its own shard.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from engine.errors import CVRError

NAMESPACE = "cvr-sdgm"
ACTOR_PREFIX = "cvr-shard"


class ClusterError(CVRError):
    """Ray missing, unreachable, or a shard actor that failed (one-line message)."""


def require_ray():
    try:
        import ray
    except ImportError:
        raise ClusterError("--ray needs Ray: pip install 'cvr-sdgm[cluster]'") from None
    return ray


def in_private_network() -> bool:
    """Whether this process sees no network interface but loopback (a private network namespace:
    `unshare -n`), where everything Ray starts listens on 127.0.0.1 only."""
    try:  # /proc/self/net belongs to this process's network namespace (/sys/class/net may not)
        with open("/proc/self/net/dev", encoding="ascii") as handle:
            names = {line.split(":")[0].strip() for line in handle.readlines()[2:]}
    except OSError:
        return False
    return names <= {"lo"}


def connect(address: str | None = None, num_cpus: int | None = None):
    """ray, initialised: `address` None or "local" starts a Ray on this machine (`num_cpus`
    logical CPUs, default all); "auto" joins the cluster this machine is part of (`ray start`);
    anything else is a cluster address (host:6379 or ray://host:10001)."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    # Ray runs its workers at nice 15: on a busy machine they starve behind everything else.
    os.environ.setdefault("RAY_worker_niceness", "0")
    local = address in (None, "", "local")
    if local and not in_private_network():
        print("cvr: a local Ray listens on every network interface of this machine (Ray's own behaviour); "
              "start it inside a private network namespace (unshare -n) or behind a firewall", file=sys.stderr)
    try:
        if local:
            ray.init(num_cpus=num_cpus, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ClusterError(f"--ray {address}: cannot connect ({str(error).strip().splitlines()[0]})") from None
    return ray


def cluster_gpus() -> float:
    ray = require_ray()
    return float(ray.cluster_resources().get("GPU", 0.0))


def shard_cpus(shards: int) -> float:
    """Logical CPUs each shard actor asks for by default: one, or less where the cluster is small
    (half of it is left to the query replicas, and to the indexing actors)."""
    ray = require_ray()
    total = float(ray.cluster_resources().get("CPU", 1.0))
    return max(0.05, min(1.0, round(total / (2 * shards), 2)))


class RayShards:
    """The fan-out over shard actors: `call(method, *args)` runs it on every shard at once and
    returns the answers in shard order; arrays go to the object store once per call, not once
    per shard. A shard's own error (a bad filter) comes back as itself."""

    def __init__(self, actors: list, names: list):
        self.actors, self.names = actors, names
        self.cpus = 0.0  # logical CPUs each actor reserved (known to the process that started them)

    @classmethod
    def start(cls, folder: str, checkpoint: str, device: str = "cpu", cpus: float | None = None,
              threads: int = 1, prefix: str = ACTOR_PREFIX) -> RayShards:
        """One actor per shard of the set at `folder`, named `prefix-shard-NNN` (so that query
        replicas find them); returns once every shard has loaded."""
        from engine.cluster.scatter import ShardSearcher
        from engine.cluster.shardset import read_shardset

        ray = require_ray()
        folder, checkpoint = os.path.abspath(folder), os.path.abspath(checkpoint)
        top = read_shardset(folder)
        cpus = shard_cpus(len(top["shards"])) if cpus is None else cpus
        gpus = 1 if device.startswith("cuda") else 0
        remote = ray.remote(ShardSearcher)
        names, actors = [], []
        for entry in top["shards"]:
            name = f"{prefix}-{entry['name']}"
            names.append(name)
            actors.append(remote.options(name=name, namespace=NAMESPACE, num_cpus=cpus, num_gpus=gpus,
                                         get_if_exists=False).remote(folder, entry, checkpoint, top["fields"],
                                                                     device, threads))
        shards = cls(actors, names)
        shards.cpus = cpus
        shards.call("info")  # waits for every load; a shard that cannot load says why here
        return shards

    @classmethod
    def attach(cls, names: list) -> RayShards:
        """The running shard actors of these names (a query replica's view of them)."""
        ray = require_ray()
        try:
            return cls([ray.get_actor(name, namespace=NAMESPACE) for name in names], list(names))
        except ValueError as error:
            raise ClusterError(f"shard actor missing: {error}") from None

    def call(self, method: str, *args) -> list:
        ray = require_ray()
        refs = [ray.put(a) if isinstance(a, np.ndarray) else a for a in args]
        try:
            return ray.get([getattr(actor, method).remote(*refs) for actor in self.actors])
        except ray.exceptions.RayTaskError as error:
            cause = getattr(error, "cause", None)
            if isinstance(cause, CVRError | OSError):
                raise cause from None
            raise
        except ray.exceptions.RayActorError as error:
            raise ClusterError(f"a shard actor is down ({str(error).strip().splitlines()[0]})") from None

    def close(self) -> None:
        ray = require_ray()
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
