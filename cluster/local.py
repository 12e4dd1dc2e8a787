"""A local Ray head for the embedded default: explicit ports on 127.0.0.1, its own temp dir, token auth,
and stopped by PID (never `ray stop`, which would stop every Ray on the host).

    python -m cluster.local up        # start the head (no-op when it is already up)
    python -m cluster.local status
    python -m cluster.local env       # `eval "$(python -m cluster.local env)"` before ray/serve CLIs
    python -m cluster.local down      # stop exactly the processes this head started
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from pydantic import BaseModel

from cluster.paths import ray_dir


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


HOST = "127.0.0.1"

# Ray Serve's throughput mode, for our replicas (set per deployment in serve_app/app.py) and for the head
# we start: user code on the replica's own event loop (no thread hop per streamed chunk), gRPC between
# deployments, GC frozen after start-up. On one H100 at 64 streams it took the app from 0.50x to 0.97x of
# raw vLLM's output tokens/s (docs/benchmarks.md). Direct ingress, also part of that mode, stays off:
# requests keep entering through Serve's proxy on the configured host and port.
SERVE_REPLICA_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}


def gcs_address(ports: LocalRayPorts | None = None) -> str:
    return f"{HOST}:{(ports or LocalRayPorts.from_env()).gcs}"


def dashboard_url(ports: LocalRayPorts | None = None) -> str:
    return f"http://{HOST}:{(ports or LocalRayPorts.from_env()).dashboard}"


def token_path() -> Path:
    return ray_dir() / "auth_token"


def client_env() -> dict[str, str]:
    """What a Ray client (ray job submit, serve deploy, ray.init) needs to reach this head. Ray reads these
    when it is imported, so set them before `import ray`."""
    return {
        "RAY_ADDRESS": dashboard_url(),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path()),
        # Keep "127.0.0.1" as it is: otherwise Ray swaps it for the host's address, where the head is not.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }


def _pidfile() -> Path:
    return ray_dir() / "head.pids"


def _marked_processes() -> set[int]:
    """PIDs whose command line names our temp dir: the head's daemons and the workers they spawned."""
    marker = str(ray_dir())
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.add(int(entry.name))
    return found


def _with_descendants(roots: set[int]) -> set[int]:
    """The roots and every process below them. Ray's agents and workers rename themselves ("ray::...")
    so their command lines no longer name our temp dir: they are found as children of the head's daemons."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


def our_processes() -> set[int]:
    """Every live process of this head: its daemons, their agents and workers, and what those started."""
    roots = {pid for pid in _recorded_pids() | _marked_processes() if _alive(pid)}
    return {pid for pid in _with_descendants(roots) if pid != os.getpid() and _alive(pid)}


def _recorded_pids() -> set[int]:
    try:
        return {int(line) for line in _pidfile().read_text().split() if line.strip()}
    except FileNotFoundError:
        return set()


def _alive(pid: int) -> bool:
    """Running (zombies, which only wait for their parent to reap them, count as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def is_up() -> bool:
    try:
        with socket.create_connection((HOST, LocalRayPorts.from_env().gcs), timeout=1):
            return any(_alive(pid) for pid in _recorded_pids())
    except OSError:
        return False


def up(num_cpus: int | None = None) -> None:
    if is_up():
        print(f"Ray head already running at {gcs_address()} (dashboard {dashboard_url()})")
        return
    ports = LocalRayPorts.from_env()
    root = ray_dir()
    root.mkdir(parents=True, exist_ok=True)
    if not token_path().exists():
        token_path().write_text(uuid.uuid4().hex)
        token_path().chmod(0o600)
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    cmd = [
        ray_cli, "start", "--head", "--disable-usage-stats",
        f"--node-ip-address={HOST}", f"--port={ports.gcs}",
        "--include-dashboard=true", f"--dashboard-host={HOST}", f"--dashboard-port={ports.dashboard}",
        f"--ray-client-server-port={ports.client_server}",
        f"--node-manager-port={ports.node_manager}", f"--object-manager-port={ports.object_manager}",
        f"--metrics-export-port={ports.metrics_export}",
        f"--dashboard-agent-listen-port={ports.dashboard_agent_listen}",
        f"--dashboard-agent-grpc-port={ports.dashboard_agent_grpc}",
        f"--runtime-env-agent-port={ports.runtime_env_agent}",
        f"--min-worker-port={ports.min_worker}", f"--max-worker-port={ports.max_worker}",
        f"--temp-dir={root}",
    ]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    env = {**os.environ, **client_env(), **SERVE_REPLICA_ENV}  # controller and proxy in the same mode
    # Job entrypoints (`ray job submit -- python -m ...`) inherit the head's PATH: put our venv first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS")  # `ray start --head` must not try to join an existing cluster
    print(f"starting Ray head at {gcs_address()} (temp dir {root}) ...", flush=True)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"ray start failed:\n{result.stdout}\n{result.stderr}")
    _pidfile().write_text("\n".join(str(pid) for pid in sorted(_marked_processes())) + "\n")
    print(f"Ray head up: {gcs_address()}, dashboard {dashboard_url()}")


def down(timeout_s: float = 10.0) -> None:
    pids = our_processes()  # gathered before any dies: orphans lose their link to the head
    if not pids:
        print("no local Ray head of ours is running")
        _pidfile().unlink(missing_ok=True)
        return
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    _wait_until_gone(pids, timeout_s)
    leftovers = {pid for pid in pids | our_processes() if _alive(pid)}
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # A killed process lingers while the kernel frees its memory (seconds for an engine's GiBs):
    # return only once they are gone, so that a caller checking right after sees none.
    _wait_until_gone(leftovers, timeout_s)
    _pidfile().unlink(missing_ok=True)
    print(f"stopped {len(pids)} Ray processes" + (f" ({len(leftovers)} killed)" if leftovers else ""))


def _wait_until_gone(pids: set[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def connect(**init_kwargs):
    """Join the Ray cluster a job should run on: the one `ray job submit` names (RAY_ADDRESS), else this
    project's local head when it is up, else a fresh local Ray that lives as long as this process.
    Call it before anything imports ray (see client_env)."""
    address = os.environ.get("RAY_ADDRESS", "")
    if address and not address.startswith("http"):
        import ray

        return ray.init(address=address, **init_kwargs)
    os.environ.pop("RAY_ADDRESS", None)  # a dashboard URL is for the job CLI, not ray.init
    if is_up():
        for key, value in client_env().items():
            if key != "RAY_ADDRESS":
                os.environ.setdefault(key, value)
        import ray

        return ray.init(address=gcs_address(), **init_kwargs)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    # The dashboard serves the state API, which Ray Train's placement-group cleaner polls.
    return ray.init(address="local", include_dashboard=True, dashboard_host=HOST, dashboard_port=free_port(),
                    **init_kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cluster.local",
                                     description="Start, inspect or stop this project's local Ray head.")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("up", help="start the head on 127.0.0.1 with pinned ports")
    start.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may schedule (default: all)")
    sub.add_parser("down", help="stop the processes this head started, by PID")
    sub.add_parser("status", help="say whether the head is up")
    sub.add_parser("env", help="print shell exports for ray / serve CLIs")
    args = parser.parse_args(argv)
    if args.command == "up":
        up(args.num_cpus)
    elif args.command == "down":
        down()
    elif args.command == "status":
        running = is_up()
        print(f"Ray head {'up' if running else 'down'} at {gcs_address()}")
        raise SystemExit(0 if running else 1)
    else:
        for key, value in client_env().items():
            print(f"export {key}={value}")


if __name__ == "__main__":
    main()
