"""Export fine-tuned weights.

  python -m jobs.export merge --base BASE --adapter ADAPTER --out OUT [--dtype float32|bfloat16|float16]
      merge a LoRA/QLoRA adapter into its full-precision base (for QLoRA: the bf16/fp32 base, not the
      4-bit one) and write a standard HF folder that the serving slice and vLLM load as it is.

Adapters need no export: the fine-tune job writes them in PEFT format (runs/finetune/<name>/adapter),
and the server loads them with vLLM's LoRA support (see `adapters:` in the serve config).
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        merge_adapter(resolve_model_path(args.base), args.adapter, args.out, args.dtype)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
