"""Export fine-tuned weights.

  python -m jobs.export merge --base BASE --adapter ADAPTER --out OUT [--dtype float32|bfloat16|float16]
      merge a LoRA/QLoRA adapter into its full-precision base (for QLoRA: the bf16/fp32 base, not the
      4-bit one) and write a standard HF folder that the serving slice and vLLM load as it is.

  python -m jobs.export pull RUN [--to DIR] [--only adapter merged ...]
      copy a fine-tune run's outputs from storage (TUNESERVE_STORAGE or any URI) to this machine.
      RUN is a run name under runs/finetune, a storage path, or a URI; DIR defaults to ./<run name>.
      Checkpoints are left out unless --only names them.

Adapters need no export: the fine-tune job writes them in PEFT format (<run>/adapter in storage), and
the server loads them, from storage too, with vLLM's LoRA support (see `adapters:` in the serve config).
"""

from __future__ import annotations

import argparse
import logging
import sys

from cluster.model_cache import resolve_model_path
from jobs.export.hf import ExportError, merge_adapter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="merge an adapter into its base model")
    merge.add_argument("--base", required=True, help="full-precision base: HF folder or 'default'")
    merge.add_argument("--adapter", required=True, help="PEFT adapter folder")
    merge.add_argument("--out", required=True, help="output folder")
    merge.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    pull = sub.add_parser("pull", help="copy a run's outputs from storage to this machine")
    pull.add_argument("run", help="run name (under runs/finetune), storage path or URI")
    pull.add_argument("--to", default=None, help="local folder (default: ./<run name>)")
    pull.add_argument("--only", nargs="+", default=None, metavar="ENTRY",
                      help="entries to copy (default: everything but checkpoint_* folders)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.command == "pull":
        return pull_run(args.run, args.to, args.only)
    try:
        merge_adapter(resolve_model_path(args.base), args.adapter, args.out, args.dtype)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


def pull_run(run: str, to: str | None, only: list[str] | None) -> int:
    from pathlib import Path

    from cluster import storage

    try:
        source = storage.locate(run if storage.is_uri(run) or "/" in run else f"runs/finetune/{run}")
        if not source.exists():
            raise storage.StorageError(f"{source.uri}: no such run in storage")
        entries = only or [name for name in source.listdir() if not name.startswith("checkpoint_")]
        target = Path(to or source.name)
        for name in entries:
            source.join(name).download(target / name)
            print(f"{source.join(name).uri} -> {target / name}")
    except storage.StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
