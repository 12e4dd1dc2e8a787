"""The project's one storage setting: where everything that more than one node must see lives.

    TUNESERVE_STORAGE=s3://bucket/tuneserve     # or gs://bucket/prefix, or file:///shared/dir
    python -m cluster.storage ls runs/finetune
    python -m cluster.storage put data/mine.jsonl data/mine.jsonl   # local file -> storage
    python -m cluster.storage get runs/finetune/assistant ./assistant   # storage -> local folder

Paths are resolved against the storage root: a URI (`s3://`, `gs://`, `file://`) is used as it is, an
absolute local path is taken as a local file (it works on one machine only), and a relative path such
as `data/assistant.jsonl` or `runs/finetune` lives under the root. On one machine the root defaults to
`file://<project>`, so relative paths mean what they always meant there; on a cluster without a shared
disk it must be an object store, and every node reaches the same bytes.

S3-compatible servers: `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`) points at them, with keys in
`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`. Filesystems are pyarrow's, as Ray Train's `storage_path`.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from cluster.paths import cache_dir

SCHEMES = ("s3", "gs", "gcs", "file")
# Downloads read objects in 64 MiB pieces, one ranged GET each, where pyarrow's copy_files reads 1 MiB: the
# embedded model's weights were 514 requests. An S3-compatible server that reads the whole object for each
# range (moto, which `cluster.local` runs) took minutes for them (python -m jobs.bench.storage_download).
DOWNLOAD_CHUNK_BYTES = 64 << 20


class StorageError(RuntimeError):
    """The storage URI cannot be used: a bad URI, missing credentials, an unreachable server, no bucket."""


def project_root() -> Path:
    """The project folder (`TUNESERVE_PROJECT`; set by cluster.local for jobs whose cwd is a Ray temp dir)."""
    return Path(os.environ.get("TUNESERVE_PROJECT") or Path(__file__).resolve().parent.parent)


def storage_root() -> str:
    return os.environ.get("TUNESERVE_STORAGE") or f"file://{project_root()}"


def is_uri(text: str) -> bool:
    return "://" in text


@dataclass(frozen=True)
class Location:
    """A place in storage: its filesystem and the path inside it (what pyarrow and Ray Train take)."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def join(self, *parts: str) -> "Location":
        tail = "/".join(p.strip("/") for p in parts if p)
        return Location(self.fs, f"{self.path.rstrip('/')}/{tail}", f"{self.uri.rstrip('/')}/{tail}")

    def at(self, path: str) -> "Location":
        """Another path in the same filesystem (e.g. a checkpoint path Ray Train reports)."""
        return Location(self.fs, path, f"{self.uri.split('://', 1)[0]}://{path}")

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def exists(self) -> bool:
        return _call(self, lambda: self.fs.get_file_info(self.path).type != pafs.FileType.NotFound)

    def is_dir(self) -> bool:
        return _call(self, lambda: self.fs.get_file_info(self.path).type == pafs.FileType.Directory)

    def is_file(self) -> bool:
        return _call(self, lambda: self.fs.get_file_info(self.path).type == pafs.FileType.File)

    def read_bytes(self) -> bytes:
        def read():
            # compression=None: the bytes as stored (pyarrow would gunzip a "*.gz" by its name)
            with self.fs.open_input_stream(self.path, compression=None) as stream:
                return stream.read()
        return _call(self, read)

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        """Whole-file write; readers never see half of it (an object PUT is atomic; local files are
        written beside and renamed)."""
        def write():
            self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
            if self.is_local:
                staged = f"{self.path}.{os.getpid()}.tmp"
                Path(staged).write_bytes(data)
                os.replace(staged, self.path)
                return
            with self.fs.open_output_stream(self.path, compression=None) as stream:
                stream.write(data)
        _call(self, write)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def delete(self) -> None:
        def delete():
            info = self.fs.get_file_info(self.path)
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(self.path)
            elif info.type == pafs.FileType.File:
                self.fs.delete_file(self.path)
        _call(self, delete)

    def listdir(self) -> list[str]:
        selector = pafs.FileSelector(self.path, allow_not_found=True)
        return sorted(info.base_name for info in _call(self, lambda: self.fs.get_file_info(selector)))

    def upload(self, local: Path) -> None:
        """A local file or folder to this place (a folder's contents replace what is there)."""
        local = Path(local)
        if local.is_dir():
            if self.exists():
                self.delete()
            _call(self, lambda: self.fs.create_dir(self.path, recursive=True))
            _call(self, lambda: pafs.copy_files(str(local), self.path, destination_filesystem=self.fs))
        else:
            _call(self, lambda: self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True))
            _call(self, lambda: pafs.copy_files(str(local), self.path, destination_filesystem=self.fs))

    def download(self, local: Path) -> Path:
        """This file or folder to a local path; returns it."""
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        kind = _call(self, lambda: self.fs.get_file_info(self.path).type)
        if kind == pafs.FileType.NotFound:
            raise StorageError(f"{self.uri}: not found in storage")
        if kind == pafs.FileType.Directory:
            local.mkdir(parents=True, exist_ok=True)  # copy_files writes into it, it does not create it
        _call(self, lambda: pafs.copy_files(self.path, str(local), source_filesystem=self.fs,
                                            chunk_size=DOWNLOAD_CHUNK_BYTES))
        return local

    def copy_to(self, target: "Location") -> None:
        """Within one storage (e.g. a checkpoint's weights to the run's adapter/ folder)."""
        if target.exists():
            target.delete()
        if target.is_local and self.is_dir():  # copy_files writes into a local folder, it does not create it
            Path(target.path).mkdir(parents=True, exist_ok=True)
        _call(self, lambda: pafs.copy_files(self.path, target.path, source_filesystem=self.fs,
                                            destination_filesystem=target.fs, chunk_size=DOWNLOAD_CHUNK_BYTES))


def _call(location: Location, action):
    try:
        return action()
    except StorageError:
        raise
    except OSError as exc:  # pyarrow reports S3/GCS failures as OSError with the SDK's message
        raise StorageError(f"{location.uri}: {_explain(exc)}") from exc


def _explain(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    lowered = text.lower()
    if "nosuchbucket" in lowered or "bucket does not exist" in lowered or "no such bucket" in lowered:
        return f"the bucket does not exist ({text})"
    if "curl" in lowered or "connect" in lowered or "network" in lowered or "timed out" in lowered:
        return f"the storage server cannot be reached ({text})"
    if "access denied" in lowered or "forbidden" in lowered or "credential" in lowered or "403" in lowered:
        return f"access denied: check the credentials ({text})"
    return text


def _s3_filesystem(bucket: str) -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        # Fail in seconds, not minutes, when the server is down: the job must say so before workers start.
        "connect_timeout": float(os.environ.get("TUNESERVE_STORAGE_CONNECT_TIMEOUT_S", 5)),
        "request_timeout": float(os.environ.get("TUNESERVE_STORAGE_REQUEST_TIMEOUT_S", 60)),
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    }
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
        # A self-hosted S3 server has no instance-metadata credentials to fall back on: say what is missing
        # rather than letting the SDK probe the network for them.
        if not (os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")):
            raise StorageError(f"s3://{bucket}: missing credentials for the S3 server {endpoint}: set "
                               "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs)


def locate(path_or_uri: str | Path) -> Location:
    """Where a recipe's or config's path lives (see the module doc for the three forms)."""
    text = str(path_or_uri)
    if not is_uri(text):
        if os.path.isabs(text) or text.startswith("~"):
            local = str(Path(text).expanduser())
            return Location(pafs.LocalFileSystem(), local, f"file://{local}")
        return locate(storage_root()).join(text)
    parsed = urlparse(text)
    scheme = parsed.scheme.lower()
    if scheme not in SCHEMES:
        raise StorageError(f"{text}: unsupported storage scheme {scheme!r} (use s3://, gs:// or file://)")
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"{text}: a file:// URI needs an absolute path (file:///dir)")
        local = parsed.path or "/"
        return Location(pafs.LocalFileSystem(), local, f"file://{local}")
    if not parsed.netloc:
        raise StorageError(f"{text}: the URI names no bucket")
    key = parsed.path.strip("/")
    path = f"{parsed.netloc}/{key}" if key else parsed.netloc
    if scheme == "s3":
        fs = _s3_filesystem(parsed.netloc)
    else:
        try:
            fs, _ = pafs.FileSystem.from_uri(f"gs://{path}")
        except (OSError, ValueError) as exc:
            raise StorageError(f"{text}: {_explain(exc)}") from exc
    return Location(fs, path, f"{scheme}://{path}")


class NotAllowed(StorageError):
    """A path given by a caller is missing, or lies outside the roots it may name. One error for both, so that
    the answer tells nothing about what exists elsewhere."""


def confined(path_or_uri: str, roots: list[str] | None = None) -> Location:
    """Where a caller-given path lives, only if it exists under one of `roots` (default: the storage root).

    A relative path is taken under the storage root. `..` is refused in any path. A local path is compared
    after its symlinks are resolved, and so is every file under it (a link inside the root that leads out is
    refused too); an object store must be the root's own store, under the root's prefix."""
    text = str(path_or_uri)
    refused = NotAllowed(f"{text[:300]}: not found, or outside the storage this service may read")
    raw_path = urlparse(text).path if is_uri(text) else text
    if ".." in raw_path.replace("\\", "/").split("/"):
        raise refused
    try:
        location = locate(text)
        allowed = [locate(root) for root in (roots or [storage_root()])]
    except StorageError:
        raise refused from None
    for root in allowed:
        if location.is_local != root.is_local:
            continue
        if location.is_local:
            resolved = _resolved_local_under(location.path, root.path)
            if resolved is not None:
                return Location(location.fs, resolved, f"file://{resolved}")
        elif location.uri.split("://")[0] == root.uri.split("://")[0] and _under(location.path, root.path):
            if location.exists():
                return location
    raise refused


def _under(path: str, root: str) -> bool:
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/")


def _resolved_local_under(path: str, root: str) -> str | None:
    """`path` with its links resolved, if it exists and it and everything under it stays under `root`."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if not os.path.exists(real) or not _under(real, real_root):
        return None
    if os.path.isdir(real):
        for folder, dirs, files in os.walk(real, followlinks=False):
            for name in dirs + files:
                if not _under(os.path.realpath(os.path.join(folder, name)), real_root):
                    return None
    return real


def check(path_or_uri: str | Path, must_exist: bool = False) -> Location:
    """Resolve and reach a location now, so that a job or a deploy fails at once with the URI and the
    problem, before any worker or replica starts."""
    location = locate(path_or_uri)
    if location.is_local:
        if must_exist and not location.exists():
            raise StorageError(f"{location.uri}: not found")
        return location
    bucket = location.path.split("/", 1)[0]
    info = _call(location, lambda: location.fs.get_file_info(bucket))
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{location.uri}: the bucket {bucket!r} does not exist")
    if must_exist and not location.exists():
        raise StorageError(f"{location.uri}: not found in storage")
    return location


# -- node-local copies: models and adapters named by storage URI ---------------------------------------


@contextmanager
def file_lock(path: Path):
    """An exclusive lock between processes of one node (replicas, workers, tests)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_COMPLETE = ".tuneserve-fetched"


def fingerprint(location: Location) -> str:
    """What a file or folder in storage holds, as its listing tells: each file's path, size and modification
    time. New bytes written to the same URI (a run published again after it resumed) change it, unless they
    have the same size and come within the store's time resolution (a second on S3)."""
    info = _call(location, lambda: location.fs.get_file_info(location.path))
    if info.type == pafs.FileType.Directory:
        selector = pafs.FileSelector(location.path, recursive=True)
        infos = _call(location, lambda: location.fs.get_file_info(selector))
    else:
        infos = [info]
    return "\n".join(sorted(f"{i.path}|{i.size}|{i.mtime_ns}" for i in infos if i.type == pafs.FileType.File))


def local_copy(path_or_uri: str | Path) -> Path:
    """A folder or file in storage as a local path on this node. Local paths are used in place; anything
    remote is fetched into this node's cache once per content (under a lock, so concurrent replicas fetch
    it once): the cache is keyed by the URI and its fingerprint, so new bytes at the same URI are fetched."""
    location = check(path_or_uri, must_exist=True)
    if location.is_local:
        return Path(location.path)
    digest = hashlib.sha256(f"{location.uri}\n{fingerprint(location)}".encode()).hexdigest()[:16]
    target = cache_dir() / "storage" / f"{location.name}-{digest}"
    marker = target.parent / f"{target.name}{_COMPLETE}"
    if marker.exists():
        return target
    with file_lock(target.parent / f".{target.name}.lock"):
        if marker.exists():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
            staged = location.download(Path(tmp) / location.name)
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            staged.rename(target)
        marker.write_text(location.uri + "\n")
    return target


def resolve_local(path: str) -> str:
    """A model/adapter reference as a local path: `default`, hub ids and local folders unchanged, storage
    URIs (and storage-relative paths that exist there) fetched to this node's cache."""
    if is_uri(path):
        return str(local_copy(path))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.storage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("root", help="print the storage root")
    ls = sub.add_parser("ls", help="list a folder in storage")
    ls.add_argument("path", nargs="?", default="")
    put = sub.add_parser("put", help="upload a local file or folder")
    put.add_argument("local")
    put.add_argument("dest", help="storage path or URI")
    get = sub.add_parser("get", help="download a file or folder")
    get.add_argument("src", help="storage path or URI")
    get.add_argument("local")
    args = parser.parse_args(argv)
    try:
        if args.command == "root":
            print(storage_root())
        elif args.command == "ls":
            location = check(args.path or storage_root())
            print("\n".join(location.listdir()))
        elif args.command == "put":
            if not Path(args.local).exists():
                raise StorageError(f"{args.local}: no such local file or folder")
            location = check(args.dest)
            location.upload(Path(args.local))
            print(f"uploaded {args.local} -> {location.uri}")
        else:
            location = check(args.src, must_exist=True)
            location.download(Path(args.local))
            print(f"downloaded {location.uri} -> {args.local}")
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
