"""Export fine-tuned weights.

  python -m jobs.export merge --base BASE --adapter ADAPTER --out OUT [--dtype float32|bfloat16|float16]
      merge a LoRA/QLoRA adapter into its full-precision base (for QLoRA: the bf16/fp32 base, not the
      4-bit one) and write a standard HF folder that the serving slice and vLLM load as it is.

  python -m jobs.export pull RUN [--to DIR] [--only adapter merged ...]
      copy a fine-tune run's outputs from storage (TUNESERVE_STORAGE or any URI) to this machine.
      RUN is a run name under runs/finetune, a storage path, or a URI; DIR defaults to ./<run name>.
      Checkpoints are left out unless --only names them.

  python -m jobs.export quantize --model MODEL --method {w4a16-gptq,w4a16-awq,w8a8-int8,fp8}
      --calibration DATA --out OUT [--samples 256] [--max-length 512] [--device cpu|cuda]
      quantize a full-precision model (HF folder, storage URI or 'default') with llm-compressor into a
      compressed-tensors folder that vLLM serves as it is (`path: OUT` in the serve config). DATA is chat
      data as the fine-tune reads it (your own records, ideally the fine-tune's) or hf:<dataset>; fp8
      needs none. Runs as a plain program or through `ray job submit`.

Adapters need no export: the fine-tune job writes them in PEFT format (<run>/adapter in storage), and
the server loads them, from storage too, with vLLM's LoRA support (see `adapters:` in the serve config).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from cluster.model_cache import resolve_model_path
from jobs.export.hf import ExportError, merge_adapter
from jobs.export.quantize import METHODS


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
    quant = sub.add_parser("quantize", help="quantize a model for serving (llm-compressor, compressed-tensors)")
    quant.add_argument("--model", required=True, help="full-precision HF folder, storage URI or 'default'")
    quant.add_argument("--method", required=True, choices=list(METHODS),
                       help="; ".join(f"{name}: {what}" for name, (what, _) in METHODS.items()))
    quant.add_argument("--calibration", default=None,
                       help="chat data (JSON/JSONL of messages or alpaca records, a storage path) or hf:<dataset>")
    quant.add_argument("--samples", type=int, default=256, help="calibration conversations to use")
    quant.add_argument("--max-length", type=int, default=512, help="calibration tokens per conversation")
    quant.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                       help="where the quantizer runs (cuda: a GPU of the Ray cluster)")
    quant.add_argument("--group-size", type=int, default=0,
                       help="4-bit methods: weights per scale (0: the largest of 128/64/32 that fits the model)")
    quant.add_argument("--out", required=True, help="output folder or storage URI")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.command == "pull":
        return pull_run(args.run, args.to, args.only)
    if args.command == "quantize":
        return quantize_model(args)
    try:
        merge_adapter(resolve_model_path(args.base), args.adapter, args.out, args.dtype)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


def quantize_model(args: argparse.Namespace) -> int:
    from jobs.export.quantize import QuantizeError, run

    try:
        summary = run(args.model, args.method, args.calibration, args.samples, args.out, args.max_length,
                      args.device, args.group_size)
    except QuantizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
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
