"""Ray for this engine: connecting to a Ray (one started here, or a cluster's), and the shard
actors: one Ray actor per shard of a set (engine.cluster.scatter.ShardSearcher inside it),
reached as a fan-out that answers like engine.cluster.scatter.LocalShards.

Every node that runs a shard actor reads the shard set and the checkpoint at the same absolute
paths (shared storage, or a copy per node): an actor loads only its own shard.
"""
from __future__ import annotations

import os
import re
import sys
import uuid

import numpy as np

from engine.errors import CVRError, UnavailableError

NAMESPACE = "cvr-sdgm"
ACTOR_PREFIX = "cvr-shard"
START_TIMEOUT_S = 600.0  # loading a shard of millions of rows takes a while; never waiting is worse
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ClusterError(UnavailableError):
    """Ray missing or unreachable, or a shard actor that failed or is too slow (one-line message)."""


def cluster_error(error: Exception, what: str) -> CVRError:
    """The one-line error a Ray failure deserves: the CVRError raised inside an actor or task as
    itself, anything else as a ClusterError naming its last meaningful line (no colour codes)."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, CVRError):
        return cause
    lines = [ANSI.sub("", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line and not line.startswith(("File ", "Traceback", "^"))]
    found = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else type(error).__name__)
    return ClusterError(f"{what}: {found}")


def require_ray():
    try:
        import ray
    except ImportError:
        raise ClusterError("--ray needs Ray: pip install 'cvr-sdgm[cluster]'") from None
    return ray


def in_private_network() -> bool:
    """Whether this process sees no network interface but loopback, and loopback is up (a private
    network namespace: `unshare -n`, then `ip link set lo up`), where everything Ray starts
    listens on 127.0.0.1 only."""
    try:  # /proc/self/net belongs to this process's network namespace (/sys/class/net may not)
        with open("/proc/self/net/dev", encoding="ascii") as handle:
            names = {line.split(":")[0].strip() for line in handle.readlines()[2:]}
    except OSError:
        return False
    return names <= {"lo"} and _loopback_up()


def _loopback_up() -> bool:
    """Whether this process can reach itself on 127.0.0.1: a new namespace's loopback is down
    (and Ray then fails with a confusing error) until `ip link set lo up`. Binding succeeds
    either way; connecting does not."""
    import socket

    try:
        with socket.socket() as server, socket.socket() as client:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            client.settimeout(2.0)
            client.connect(server.getsockname())
        return True
    except OSError:
        return False


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
        self.timeout = None  # seconds a call may take (a server sets its request deadline)

    @classmethod
    def start(cls, folder: str, checkpoint: str, device: str = "cpu", cpus: float | None = None,
              threads: int = 1, prefix: str | None = None, timeout: float = START_TIMEOUT_S) -> RayShards:
        """One actor per shard of the set at `folder`, named `prefix-shard-NNN` (unique per call
        unless given, so that two servers on one cluster never meet; query replicas attach by
        name); returns once every shard has loaded, or cleans up and raises one line."""
        from engine.cluster.scatter import ShardSearcher
        from engine.cluster.shardset import check_shards, read_shardset

        ray = require_ray()
        folder, checkpoint = os.path.abspath(folder), os.path.abspath(checkpoint)
        top = read_shardset(folder)
        check_shards(folder, top)  # a missing or changed shard is refused here, with its own message
        total = float(ray.cluster_resources().get("CPU", 1.0))
        cpus = shard_cpus(len(top["shards"])) if cpus is None else float(cpus)
        if not 0 <= cpus <= total:
            raise ClusterError(f"--shard-cpus {cpus:g}: must be between 0 and the cluster's {total:g} CPUs")
        prefix = prefix or f"{ACTOR_PREFIX}-{uuid.uuid4().hex[:8]}"
        gpus = 1 if device.startswith("cuda") else 0
        remote = ray.remote(ShardSearcher)
        shards = cls([], [])
        shards.cpus = cpus
        try:
            for entry in top["shards"]:
                name = f"{prefix}-{entry['name']}"
                # A shard actor holds nothing but what it loads: Ray restarts it where it died.
                actor = remote.options(name=name, namespace=NAMESPACE, num_cpus=cpus, num_gpus=gpus,
                                       max_restarts=3, max_task_retries=1)
                shards.actors.append(actor.remote(folder, entry, checkpoint, top["fields"], device, threads))
                shards.names.append(name)
            shards.call("info", timeout=timeout)  # waits for every load
        except BaseException as error:
            shards.close()
            if isinstance(error, ValueError) and "already" in str(error):
                raise ClusterError(f"shard actors named {prefix}-* already run on this cluster") from None
            if isinstance(error, ClusterError) and "did not answer" in str(error):
                raise ClusterError(f"the {len(top['shards'])} shard actors did not start within {timeout:g} s "
                                   f"(each asks {cpus:g} CPUs of the cluster's {total:g}; see `ray status`)") from None
            raise
        return shards

    @classmethod
    def attach(cls, names: list) -> RayShards:
        """The running shard actors of these names (a query replica's view of them)."""
        ray = require_ray()
        try:
            return cls([ray.get_actor(name, namespace=NAMESPACE) for name in names], list(names))
        except ValueError as error:
            raise ClusterError(f"shard actor missing: {error}") from None

    def call(self, method: str, *args, timeout: float | None = None) -> list:
        ray = require_ray()
        refs = [ray.put(a) if isinstance(a, np.ndarray) else a for a in args]
        try:
            return ray.get([getattr(actor, method).remote(*refs) for actor in self.actors],
                           timeout=timeout if timeout is not None else self.timeout)
        except ray.exceptions.GetTimeoutError:
            raise ClusterError(f"a shard did not answer {method} within {timeout or self.timeout:g} s") from None
        except ray.exceptions.RayError as error:
            raise cluster_error(error, "a shard actor failed") from None

    def close(self) -> None:
        ray = require_ray()
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except ValueError:  # already gone
                pass
        self.actors, self.names = [], []
