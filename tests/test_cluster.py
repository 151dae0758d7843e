"""Runs the Ray cases (tests/cluster_cases*.py) in a child pytest inside a private network namespace
that this test creates (`unshare -n`, then loopback up): everything Ray starts listens on
127.0.0.1 only, and the child's Ray is shut down at the end of its session. Needs root (as CI
runs), unshare and ip; the cluster extra (`make install` installs it)."""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _namespace_command() -> list:
    if os.geteuid() != 0:
        pytest.skip("a private network namespace needs root (CI runs as root)")
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    pytest.importorskip("ray", reason="Ray is the cluster extra: pip install 'cvr-sdgm[cluster]'")
    inner = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
             *sorted(glob.glob(os.path.join(REPO, "tests", "cluster_cases*.py")))]
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *inner]


def test_ray_cases_pass_inside_a_private_network_namespace():
    done = subprocess.run(_namespace_command(), cwd=REPO, capture_output=True, text=True, timeout=1200,
                          env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
    tail = (done.stdout[-8000:] + "\n" + done.stderr[-4000:]).strip()
    assert done.returncode == 0, tail
    summary = done.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary and "failed" not in summary, tail
