"""Fetching a model from S3-compatible storage: pyarrow's default read size against the project's, in one run.

A node fetches a model or adapter named by a storage URI into its cache (`cluster.storage.local_copy`) with
pyarrow's `copy_files`, which reads the object in `chunk_size` pieces: one ranged GET each. pyarrow's default
is 1 MiB, so the embedded model's 540 MB of weights took 514 requests. Each contender downloads the same object
from the same server, alternately (A B B A ...), and the bytes are checked.

    python -m jobs.bench.storage_download                          # moto's S3 server on loopback, 540 MB
    python -m jobs.bench.storage_download --uri s3://bucket/some/model.safetensors --chunks 1,8,64

Without `--uri` it starts moto's S3 server (the one `cluster.local` runs for multi-node clusters) on
127.0.0.1 and uploads `--size-mb` of random bytes to it; with `--uri` it reads that object with the
environment's credentials (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench.storage_download", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uri", help="an object to download (s3:// or gs://); default: upload one to a local moto")
    parser.add_argument("--size-mb", type=int, default=540, help="the uploaded object's size (default 540: the "
                        "embedded model's weights)")
    parser.add_argument("--chunks", default="1,project", help="read sizes in MiB, comma-separated; `project` is "
                        "cluster.storage's (default: 1,project)")
    parser.add_argument("--repeats", type=int, default=2, help="downloads per contender (default 2)")
    args = parser.parse_args(argv)

    import pyarrow
    import pyarrow.fs as pafs

    from cluster import storage
    from cluster.s3_server import start_moto
    from cluster.ports import free_port

    chunks = [storage.DOWNLOAD_CHUNK_BYTES if c.strip() == "project" else int(c) << 20 for c in args.chunks.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    server = None
    try:
        if args.uri:
            location = storage.locate(args.uri)
        else:
            port = free_port()
            server, endpoint = start_moto("127.0.0.1", port, work / "s3.log"), f"http://127.0.0.1:{port}"
            os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
                               "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_EC2_METADATA_DISABLED": "true"})
            pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="bench",
                              secret_key="bench-secret", region="us-east-1",
                              allow_bucket_creation=True).create_dir("bench")
            source = work / "object.bin"
            with open(source, "wb") as handle:
                for _ in range(args.size_mb):
                    handle.write(os.urandom(1 << 20))
            location = storage.locate("s3://bench/object.bin")
            started = time.monotonic()
            location.upload(source)
            print(f"uploaded {args.size_mb} MiB to moto at {endpoint} in {time.monotonic() - started:.1f} s")
        size = location.fs.get_file_info(location.path).size
        expected = None
        rows: dict[int, list[float]] = {c: [] for c in chunks}
        for repeat in range(args.repeats):
            for chunk in chunks if repeat % 2 == 0 else list(reversed(chunks)):
                target = work / f"down-{chunk}"
                target.mkdir(exist_ok=True)
                started = time.monotonic()
                pafs.copy_files(location.path, str(target / "object"), source_filesystem=location.fs,
                                chunk_size=chunk)
                rows[chunk].append(time.monotonic() - started)
                digest = _sha256(target / "object")
                expected = expected or digest
                assert digest == expected, f"chunk {chunk >> 20} MiB: the bytes differ"
                (target / "object").unlink()
                print(f"  chunk {chunk >> 20:>4} MiB, repeat {repeat + 1}: {rows[chunk][-1]:.2f} s")
        print(f"\n{location.uri}: {size / 1e6:.0f} MB; pyarrow {pyarrow.__version__}, Python "
              f"{platform.python_version()}, {os.cpu_count()} CPUs\n")
        print("| read size | requests | downloads (s) | best (s) | MB/s (best) |")
        print("|---|---|---|---|---|")
        for chunk, times in rows.items():
            print(f"| {chunk >> 20} MiB | {-(-size // chunk)} | {', '.join(f'{t:.2f}' for t in times)} | "
                  f"{min(times):.2f} | {size / 1e6 / min(times):.0f} |")
        slowest = max(rows, key=lambda c: min(rows[c]))
        for chunk in rows:
            if chunk != slowest:
                print(f"\n{chunk >> 20} MiB against {slowest >> 20} MiB: "
                      f"{min(rows[slowest]) / min(rows[chunk]):.1f}x faster (best of each)")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
