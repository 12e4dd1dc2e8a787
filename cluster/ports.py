"""Ports on this host: the pinned ones a local Ray head opens, and free ones for servers we start."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from pydantic import BaseModel

HOST = "127.0.0.1"


class LocalRayPorts(BaseModel):
    """Every port Ray opens, pinned, so that the head never collides with another Ray on this host."""

    gcs: int
    dashboard: int
    client_server: int
    node_manager: int
    object_manager: int
    metrics_export: int
    dashboard_agent_listen: int
    dashboard_agent_grpc: int
    runtime_env_agent: int
    min_worker: int
    max_worker: int

    @classmethod
    def from_env(cls) -> "LocalRayPorts":
        """`TUNESERVE_RAY_PORT` (GCS, default 6390) and the next 7 ports; `TUNESERVE_DASHBOARD_PORT`
        (default 8265); workers use `TUNESERVE_RAY_WORKER_PORTS` (default 11000-11999)."""
        base = int(os.environ.get("TUNESERVE_RAY_PORT", 6390))
        low, high = os.environ.get("TUNESERVE_RAY_WORKER_PORTS", "11000-11999").split("-")
        return cls(gcs=base, node_manager=base + 1, object_manager=base + 2, metrics_export=base + 3,
                   dashboard_agent_listen=base + 4, dashboard_agent_grpc=base + 5, runtime_env_agent=base + 6,
                   client_server=base + 7, dashboard=int(os.environ.get("TUNESERVE_DASHBOARD_PORT", 8265)),
                   min_worker=int(low), max_worker=int(high))


# Ports handed out by free_port: from here up to the kernel's ephemeral range, so above Ray's default
# worker ports (10002-19999) and the tests' pinned port blocks (20000-23999). A port the kernel picked
# (bind to 0) can be taken by any outgoing connection or by Ray's own port picking before our server binds
# it; CI once lost the dashboard of a job's own Ray that way.
FREE_PORT_LOW = 24000
# Serve's direct ingress gives ingress replicas HTTP ports from this range (Ray's settings, read as Ray reads
# them): a port handed out here could be taken by a replica before our server binds it.
DIRECT_INGRESS_HTTP_PORTS = range(int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "30000")),
                                  int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", "31000")) + 1)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now, outside the kernel's ephemeral range (see above)."""
    import random

    high = _ephemeral_low() - 1
    pick = random.SystemRandom()  # not the global generator, which a test or a seeded job may have fixed
    for _ in range(200 if high > FREE_PORT_LOW else 0):
        port = pick.randint(FREE_PORT_LOW, high)
        if port in DIRECT_INGRESS_HTTP_PORTS:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # no room below the ephemeral range: let the kernel pick
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_ready(url: str, timeout_s: float = 900, process: "subprocess.Popen | None" = None) -> None:
    """Until GET `url` answers 200: a server we started (`process`, whose exit ends the wait) is ready."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")
