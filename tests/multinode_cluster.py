"""The multi-node cluster the tests in tests/test_multinode.py share: `python -m cluster.local up --nodes 3`
on its own ports and temp dir, driven through the commands a user types, and the FIGURE lines they print."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from cluster.ports import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
BIN = Path(sys.executable).parent
MODEL_ID = "smollm2-135m-instruct"


FIGURES = Path(tempfile.gettempdir()) / "tuneserve-multinode-figures.jsonl"


def figure(name: str, value) -> None:
    """A measured figure: printed, and appended to FIGURES (pytest keeps a passing test's prints)."""
    print(f"FIGURE {name} = {value}", flush=True)
    with FIGURES.open("a") as handle:
        handle.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), name: value}) + "\n")


class Cluster:
    def __init__(self, env: dict[str, str]):
        self.base_env = env
        self.env: dict[str, str] = {}
        self.serve_port = free_port()  # Serve keeps the HTTP options of its first deploy

    def run(self, *args: str, timeout: float = 600, check: bool = True, env: dict | None = None):
        result = subprocess.run(list(args), env={**self.base_env, **self.env, **(env or {})}, cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=timeout)
        if check:
            assert result.returncode == 0, f"{shlex.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result

    def local(self, *args: str, timeout: float = 300):
        return self.run(PYTHON, "-m", "cluster.local", *args, timeout=timeout)

    def read_env(self) -> None:
        exports = self.run(PYTHON, "-m", "cluster.local", "env").stdout
        self.env = dict(line.removeprefix("export ").split("=", 1) for line in exports.splitlines() if "=" in line)

    @property
    def token(self) -> str:
        return Path(self.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()

    def dashboard(self, route: str) -> dict:
        request = urllib.request.Request(self.env["RAY_ADDRESS"] + route,
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def state(self) -> dict:
        return json.loads(Path(self.base_env["TUNESERVE_RAY_DIR"], "cluster.json").read_text())

    @property
    def head_ip(self) -> str:
        return self.state()["network"]["head_ip"]

    def node_ip(self, index: int) -> str:
        return next(n["ip"] for n in self.state()["network"]["nodes"] if n["index"] == index)

    def node_index(self, ip: str) -> int:
        return next(n["index"] for n in self.state()["network"]["nodes"] if n["ip"] == ip)

    def storage_text(self, path: str) -> str | None:
        code = ("import sys; from cluster.storage import locate; l = locate(sys.argv[1]); "
                "print(l.read_text() if l.is_file() else '', end='')")
        out = self.run(PYTHON, "-c", code, path, timeout=60).stdout
        return out or None

    def replicas(self, app: str = "tuneserve") -> dict[str, list[tuple[str, str]]]:
        details = self.dashboard("/api/serve/applications/")["applications"].get(app)
        if not details:
            return {}
        return {name: [(r.get("node_ip"), r["state"]) for r in dep["replicas"]]  # no IP while pending
                for name, dep in details["deployments"].items()}

    def replica_ids(self, deployment: str, app: str = "tuneserve") -> dict[str, str]:
        """Serve's replica id (the one its routers hash) -> node IP, for the running replicas of `deployment`."""
        details = self.dashboard("/api/serve/applications/")["applications"][app]["deployments"][deployment]
        return {r["replica_id"]: r.get("node_ip") for r in details["replicas"] if r["state"] == "RUNNING"}

    def proxies(self) -> dict[str, str]:
        """Serve proxy status by node IP (Serve runs one on the head and on each node holding a replica)."""
        return {p["node_ip"]: p["status"] for p in self.dashboard("/api/serve/applications/")["proxies"].values()}

    def app_status(self, app: str = "tuneserve") -> tuple[str | None, str]:
        details = self.dashboard("/api/serve/applications/")["applications"].get(app)
        return (details["status"], details.get("message", "")) if details else (None, "")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`python -m cluster.local up --nodes 3`, on its own ports and temp dir; `down` at the end, checked to
    leave no process, namespace or bridge behind."""
    from cluster import netns

    problem = netns.can_create_namespaces()
    if problem:
        pytest.fail(f"the multi-node tests need network and mount namespaces: {problem}")
    from tests.conftest import free_port_block

    base = free_port_block(10 + 300)  # one block: the head's ports and the worker range must not overlap
    workers = base + 10
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "TUNESERVE_RAY", "AWS_"))}
    env.pop("TUNESERVE_STORAGE", None)
    env.update({"TUNESERVE_RAY_DIR": tempfile.mkdtemp(prefix="tsmn-", dir="/tmp"), "TUNESERVE_RAY_PORT": str(base),
                "TUNESERVE_DASHBOARD_PORT": str(base + 9), "TUNESERVE_RAY_WORKER_PORTS": f"{workers}-{workers + 299}",
                "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1"})
    c = Cluster(env)
    started = time.monotonic()
    namespaces, bridge = [], None
    try:
        c.local("up", "--nodes", "3")  # inside the try: a failed `up` is still taken down
        figure("cluster_up_s", round(time.monotonic() - started, 1))
        c.read_env()
        namespaces = [n["netns"] for n in c.state()["network"]["nodes"]]
        bridge = c.state()["network"]["bridge"]
        yield c
    finally:
        c.local("down")
        leftovers = subprocess.run([PYTHON, "-c", "from cluster import local; print(sorted(local.our_processes()))"],
                                   env=env, capture_output=True, text=True, cwd=REPO_ROOT).stdout.strip()
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        links = subprocess.run(["ip", "link", "show"], capture_output=True, text=True).stdout
        assert leftovers == "[]", f"down left processes behind: {leftovers}"
        assert not any(ns in listed for ns in namespaces), f"down left namespaces behind: {listed}"
        assert bridge is None or bridge not in links, "down left the bridge behind"
