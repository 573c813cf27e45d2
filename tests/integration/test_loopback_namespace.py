"""cluster/loopback_only.sh: a local Ray cluster in a network namespace whose only interface is loopback.
Ray binds its internal ports on every interface; from outside the namespace none of them answers."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "cluster" / "loopback_only.sh"
INSIDE = """
import json, subprocess, sys
import ray
ray.init(num_cpus=1, include_dashboard=False)
assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42  # the cluster works inside
listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout.splitlines()
ports = sorted({int(row.split()[3].rsplit(":", 1)[1]) for row in listening})
print(json.dumps({"ports": ports, "gcs": ray.get_runtime_context().gcs_address}), flush=True)
sys.stdin.read()  # keep the cluster up until the test closes stdin
ray.shutdown()
"""


def namespaces_available() -> bool:
    try:
        return subprocess.run(["sh", str(SCRIPT), "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def answers(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((host, port)) == 0


def listening_here() -> set[int]:
    """TCP ports with a listening socket in this (the test's own) network namespace."""
    rows = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout.splitlines()
    return {int(row.split()[3].rsplit(":", 1)[1]) for row in rows}


def host_addresses() -> list[str]:
    """This host's own addresses (outside the namespace): loopback and whatever interfaces it has."""
    found = {"127.0.0.1"}
    try:
        found.update(info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET))
    except socket.gaierror:
        pass
    return sorted(found)


@pytest.mark.skipif(not namespaces_available(), reason="unprivileged user and network namespaces "
                                                        "(unshare -rn) are not available on this machine")
def test_ray_ports_in_a_loopback_only_namespace_are_unreachable_from_outside():
    inside = subprocess.Popen(["sh", str(SCRIPT), sys.executable, "-c", INSIDE], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = inside.stdout.readline()
        assert line, "Ray did not start inside the namespace"
        found = json.loads(line)
        gcs_port = int(found["gcs"].rsplit(":", 1)[1])
        assert gcs_port in found["ports"] and len(found["ports"]) >= 5  # GCS, raylet, workers, agents
        # Some of Ray's ports are fixed (the dashboard agent's 52365, ...): a Ray running outside the
        # namespace (another test's cluster) listens on them too, so only the others can tell.
        telling = sorted(set(found["ports"]) - listening_here())
        assert gcs_port in telling and len(telling) >= 5
        reachable = [(host, port) for host in host_addresses() for port in telling if answers(host, port)]
        assert reachable == []
    finally:
        inside.stdin.close()
        inside.wait(timeout=60)
