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
import yaml

from cluster.ports import free_port
from tests import readme

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
BIN = Path(sys.executable).parent
MODEL_ID = "smollm2-135m-instruct"
# The README's "cluster path" block: the fixture and the tests run its commands as written (README_RUN lists
# those run), with one documented addition: TUNESERVE_MAX_STEPS, which makes its fine-tune a smoke run.
README_BLOCK = readme.block("cluster.local up")
README_RUN: set[str] = set()
SMOKE_STEPS = 2


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

    def shell(self, command: str, timeout: float = 600, env: dict | None = None):
        """A command as a user types it, in bash, with this cluster's environment and the project's venv first
        on PATH (`python`, `ray`, `serve`)."""
        env = {"PATH": f"{BIN}:{os.environ['PATH']}", **(env or {})}
        result = self.run("bash", "-c", command, timeout=timeout, check=False, env=env)
        assert result.returncode == 0, f"{command}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result

    def readme(self, containing: str, timeout: float = 600):
        """The README cluster block's command containing `containing`, run as written."""
        command = readme.command(README_BLOCK, containing)
        README_RUN.add(command)
        return self.shell(command, timeout=timeout)

    def local(self, *args: str, timeout: float = 300):
        return self.run(PYTHON, "-m", "cluster.local", *args, timeout=timeout)

    def read_env(self) -> None:
        """The environment the README's `eval "$(python -m cluster.local env)"` leaves a user's shell in."""
        command = readme.command(README_BLOCK, "cluster.local env")
        README_RUN.add(command)
        before = dict(self.base_env, PATH=f"{BIN}:{os.environ['PATH']}")
        after = self.run("bash", "-c", f"{command}\nenv -0", env={"PATH": before["PATH"]}).stdout
        pairs = (item.split("=", 1) for item in after.split("\0") if "=" in item)
        self.env = {k: v for k, v in pairs if before.get(k) != v and k not in ("SHLVL", "_", "PWD", "OLDPWD")}
        assert "RAY_ADDRESS" in self.env and "TUNESERVE_STORAGE" in self.env, self.env

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
                "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1",
                # Every node's processes inherit it: the README's fine-tune is a smoke run (its driver reads it).
                "TUNESERVE_MAX_STEPS": str(SMOKE_STEPS)})
    c = Cluster(env)
    started = time.monotonic()
    namespaces, bridge = [], None
    try:
        c.readme("cluster.local up", timeout=300)  # inside the try: a failed `up` is still taken down
        figure("cluster_up_s", round(time.monotonic() - started, 1))
        c.read_env()
        namespaces = [n["netns"] for n in c.state()["network"]["nodes"]]
        bridge = c.state()["network"]["bridge"]
        yield c
    finally:
        c.readme("cluster.local down", timeout=300)
        leftovers = subprocess.run([PYTHON, "-c", "from cluster import local; print(sorted(local.our_processes()))"],
                                   env=env, capture_output=True, text=True, cwd=REPO_ROOT).stdout.strip()
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        links = subprocess.run(["ip", "link", "show"], capture_output=True, text=True).stdout
        assert leftovers == "[]", f"down left processes behind: {leftovers}"
        assert not any(ns in listed for ns in namespaces), f"down left namespaces behind: {listed}"
        assert bridge is None or bridge not in links, "down left the bridge behind"
        # Every command of the README's block ran as written, but the deploy: it runs with its port changed
        # (Serve keeps the first deploy's port, and this machine's 8000 may be in use) and its app config.
        unrun = [c for c in README_BLOCK if c not in README_RUN and " serve deploy " not in f" {c}"]
        assert not unrun, f"README commands no test ran: {unrun}"


def run_metrics(cluster: Cluster, run: str) -> list[dict]:
    text = cluster.storage_text(f"runs/finetune/{run}/metrics.jsonl") or ""
    return [json.loads(line) for line in text.splitlines() if line]


def run_attempts(cluster: Cluster, run: str) -> list[dict]:
    text = cluster.storage_text(f"runs/finetune/{run}/attempts.jsonl") or ""
    return [json.loads(line) for line in text.splitlines() if line]


def deploy(cluster: Cluster, app_config: dict | str, tmp_path: Path) -> None:
    """`serve deploy` of serve-cluster.yaml (Serve on every address of every node) with this app config: a
    dict, or a config file's text as it is."""
    (tmp_path / "app.yaml").write_text(app_config if isinstance(app_config, str) else yaml.safe_dump(app_config))
    serve_config = yaml.safe_load((REPO_ROOT / "serve_app/configs/serve-cluster.yaml").read_text())
    serve_config["http_options"]["port"] = cluster.serve_port
    serve_config["applications"][0]["args"]["config"] = str(tmp_path / "app.yaml")
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(serve_config))
    cluster.run(str(BIN / "serve"), "deploy", str(tmp_path / "serve.yaml"))


def wait_status(cluster: Cluster, wanted: set[str], timeout_s: float) -> tuple[str, str]:
    deadline = time.monotonic() + timeout_s
    while True:
        status, message = cluster.app_status()
        if status in wanted:
            return status, message
        assert time.monotonic() < deadline, f"app status {status} after {timeout_s} s: {message}"
        time.sleep(2)


def get_from(netns: str, url: str, key: str | None = None) -> tuple[int, dict]:
    """GET from inside a worker node's network namespace: a client on another machine of the cluster."""
    code = ("import sys, urllib.request, urllib.error\n"
            "headers = {'Authorization': 'Bearer ' + sys.argv[2]} if len(sys.argv) > 2 else {}\n"
            "try:\n    r = urllib.request.urlopen(urllib.request.Request(sys.argv[1], headers=headers), timeout=30)\n"
            "    print(r.status); print(r.read().decode())\n"
            "except urllib.error.HTTPError as e:\n    print(e.code); print(e.read().decode())\n")
    done = subprocess.run(["ip", "netns", "exec", netns, PYTHON, "-c", code, url, *([key] if key else [])],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    status, _, body = done.stdout.partition("\n")
    try:
        return int(status), json.loads(body)
    except ValueError:
        return int(status), {"text": body[:2000]}


def post_json(url: str, body: dict, key: str) -> tuple[int, dict]:
    import httpx

    answer = httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    return answer.status_code, answer.json()
