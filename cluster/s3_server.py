"""An S3-compatible server (moto) on this host: the shared storage of a local multi-node cluster, and a real
object store for tests and benchmarks."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def start_moto(host: str, port: int, log: Path) -> subprocess.Popen:
    """moto's S3 server on host:port, logging to `log`; returns once it accepts connections."""
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if not moto:
        raise SystemExit("moto's S3 server is not installed next to this Python: pip install 'moto[server]'")
    process = subprocess.Popen([moto, "-H", host, "-p", str(port)], stdout=open(log, "w"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise SystemExit(f"the S3 server did not start; see {log}")
            time.sleep(0.2)
