"""Simulated machines on one host, for the local multi-node cluster: each node is a Linux network
namespace (its own IP on a private bridge) and a private mount namespace (its own tmpfs /tmp and no view
of the head's runs/, data/ or model cache). Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN).

Only addresses on the bridge this module creates are used; nothing is routed off the host.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import shlex
import subprocess
from pathlib import Path

from pydantic import BaseModel


class NetnsError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def can_create_namespaces() -> str | None:
    """None when this process can make network and mount namespaces, else why not."""
    if os.geteuid() != 0:
        return "the local multi-node cluster needs root (network and mount namespaces)"
    probe = f"tsprobe{os.getpid() % 100000}"
    try:
        _ip("netns", "add", probe)
        result = subprocess.run(["ip", "netns", "exec", probe, "unshare", "--mount", "--propagation", "private",
                                 "mount", "-t", "tmpfs", "tmpfs", "/mnt"], capture_output=True, text=True)
        if result.returncode != 0:
            return f"cannot mount a tmpfs in a new mount namespace: {result.stderr.strip()}"
    except (NetnsError, FileNotFoundError) as exc:
        return f"cannot create a network namespace: {exc}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


class NodeSpec(BaseModel):
    index: int
    netns: str
    veth: str
    ip: str


class Network(BaseModel):
    """A bridge with the head's address, and one namespace per worker node."""

    bridge: str
    subnet: str  # e.g. 10.213.57.0/24
    head_ip: str
    nodes: list[NodeSpec] = []


def _used_subnets() -> list[ipaddress.IPv4Network]:
    used = []
    for line in _ip("-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        first = line.split()[0] if line.split() else ""
        try:
            used.append(ipaddress.ip_network(first, strict=False))
        except ValueError:
            continue
    return used


def plan_network(tag: str, workers: int) -> Network:
    """Names and addresses for a cluster tagged `tag` (a hash of its temp dir): a /24 in 10.213.0.0/16
    that no route on this host uses yet."""
    digest = hashlib.sha256(tag.encode()).hexdigest()
    short = digest[:4]
    used = _used_subnets()
    start = int(digest[4:6], 16)
    for offset in range(256):
        subnet = ipaddress.ip_network(f"10.213.{(start + offset) % 250 + 3}.0/24")
        if not any(subnet.overlaps(u) for u in used if u.prefixlen > 0):
            break
    else:
        raise NetnsError("no free /24 in 10.213.0.0/16 for the cluster's bridge")
    hosts = list(subnet.hosts())
    nodes = [NodeSpec(index=i, netns=f"ts-{short}-n{i}", veth=f"tsv{short}n{i}", ip=str(hosts[10 + i]))
             for i in range(1, workers + 1)]
    return Network(bridge=f"tsbr{short}", subnet=str(subnet), head_ip=str(hosts[0]), nodes=nodes)


def create(network: Network) -> None:
    prefix = network.subnet.split("/")[1]
    if _ip("link", "show", network.bridge, check=False).returncode != 0:
        _ip("link", "add", network.bridge, "type", "bridge")
        _ip("addr", "add", f"{network.head_ip}/{prefix}", "dev", network.bridge)
        _ip("link", "set", network.bridge, "up")
    for node in network.nodes:
        create_node(network, node)


def create_node(network: Network, node: NodeSpec) -> None:
    prefix = network.subnet.split("/")[1]
    if node.netns in _ip("netns", "list").stdout.split():
        return
    _ip("netns", "add", node.netns)
    _ip("link", "add", node.veth, "type", "veth", "peer", "name", "eth0", "netns", node.netns)
    _ip("link", "set", node.veth, "master", network.bridge)
    _ip("link", "set", node.veth, "up")
    in_ns = ("netns", "exec", node.netns, "ip")
    _ip(*in_ns, "link", "set", "lo", "up")
    _ip(*in_ns, "addr", "add", f"{node.ip}/{prefix}", "dev", "eth0")
    _ip(*in_ns, "link", "set", "eth0", "up")
    _ip(*in_ns, "route", "add", "default", "via", network.head_ip)


def destroy(network: Network) -> None:
    """Remove exactly what create() made (the veth peers go with their namespaces)."""
    for node in network.nodes:
        _ip("link", "del", node.veth, check=False)
        _ip("netns", "del", node.netns, check=False)
    _ip("link", "del", network.bridge, check=False)


def _netns_inode(name: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return None


def processes_in(netns: str) -> set[int]:
    """Every process whose network namespace is `netns`: the whole simulated machine."""
    inode = _netns_inode(netns)
    if inode is None:
        return set()
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.stat(entry / "ns" / "net").st_ino == inode:
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


def node_command(node: NodeSpec, private_dirs: list[Path], keep: list[Path], command: list[str]) -> list[str]:
    """`command` run inside the node: its network namespace, and a mount namespace where /tmp and each of
    `private_dirs` is an empty tmpfs (the node's own disk). Folders in `keep` (the installed project, the
    Python environment) stay visible even when they live under /tmp: they are bound aside on a scratch
    tmpfs at /mnt before /tmp is covered, then bound back."""
    q = shlex.quote
    under_tmp = [d for d in keep if Path("/tmp") in d.parents
                 and not any(other in d.parents for other in keep)]  # a venv inside the project goes with it
    steps = ["mount -t tmpfs tmpfs /mnt"] if under_tmp else []
    for i, folder in enumerate(under_tmp):
        steps += [f"mkdir -p /mnt/keep{i}", f"mount --rbind {q(str(folder))} /mnt/keep{i}"]
    steps.append("mount -t tmpfs tmpfs /tmp")
    for i, folder in enumerate(under_tmp):
        steps += [f"mkdir -p {q(str(folder))}", f"mount --rbind /mnt/keep{i} {q(str(folder))}"]
    for folder in private_dirs:
        steps += [f"mkdir -p {q(str(folder))}", f"mount -t tmpfs tmpfs {q(str(folder))}"]
    script = " && ".join(steps) + f" && exec {shlex.join(command)}"
    return ["ip", "netns", "exec", node.netns, "unshare", "--mount", "--propagation", "private",
            "/bin/sh", "-c", script]
