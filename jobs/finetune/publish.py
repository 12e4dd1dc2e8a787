"""Publish a finished fine-tune to the running service, only if its evaluation passes the recipe's gate.

  python -m jobs.finetune --config recipe.yaml            # trains, then publishes when the recipe has `publish:`
  python -m jobs.finetune.publish --config recipe.yaml    # publishes a run that has already finished

The recipe's section:

  publish:
    endpoint: http://127.0.0.1:8000       # the service (TUNESERVE_ADMIN_KEY holds an admin key if auth is on)
    adapter_id: assistant-v2
    gate: {heldout: data/assistant.heldout.jsonl, min_identity: 0.8, max_ppl_change: 0.1}

The gate runs the recipe's evaluator (`gate.evaluator`: by default the assistant evaluation of
jobs/evaluate/assistant.py, base and tuned side by side), or the user's `gate.command`. If it passes,
the adapter is registered (`POST /v1/adapters`) and this waits until the service lists it and answers with
it; if not, nothing is published and the figures say why. Either way `<run>/publish.json` records it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time

import httpx

from cluster import storage
from cluster.storage import Location, locate
from jobs.finetune.config import ConfigError, FinetuneConfig, GateError, GateSection, PublishSection, load_config

log = logging.getLogger("tuneserve.publish")


class PublishError(RuntimeError):
    """The adapter could not be published: the gate refused it (`refused`), or the service did."""

    def __init__(self, message: str, refused: bool = False):
        super().__init__(message)
        self.refused = refused

    def exit_code(self) -> int:
        """Said on stderr; the command's exit code: 3 when the gate refused, 2 for any other failure."""
        print(f"{'refused' if self.refused else 'error'}: {self}", file=sys.stderr)
        return 3 if self.refused else 2


# The evaluators a recipe names by a short name; any other is "module:function".
GATE_EVALUATORS = {"assistant": "jobs.evaluate.assistant:gate"}


def evaluator(name: str):
    """The gate's evaluator function, imported by name: the generic job knows no evaluation of its own."""
    import importlib

    module, function = GATE_EVALUATORS.get(name, name).split(":")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as exc:
        raise PublishError(f"publish.gate.evaluator {name!r}: {exc}") from None


def run_gate(gate: GateSection, base: str, summary: dict, run: Location) -> tuple[bool, dict, list[str]]:
    """(passed, figures, reasons it failed)."""
    if gate.command is not None:
        env = {**os.environ, "TUNESERVE_ADAPTER": adapter_uri(summary), "TUNESERVE_MERGED": summary.get("merged", "")}
        started = time.perf_counter()
        done = subprocess.run(gate.command, env=env, capture_output=True, text=True)
        figures = {"command": gate.command, "exit_code": done.returncode, "wall_s": round(time.perf_counter() - started, 1),
                   "output_tail": (done.stdout + done.stderr)[-2000:]}
        return done.returncode == 0, figures, [] if done.returncode == 0 else [f"gate command exited {done.returncode}"]
    try:
        return evaluator(gate.evaluator)(gate, base, summary, run)
    except GateError as exc:
        raise PublishError(str(exc)) from None


def adapter_uri(summary: dict) -> str:
    if not summary.get("adapter"):
        raise PublishError("only adapters are published (model.method lora or qlora); this run has none")
    return locate(summary["adapter"]).uri  # a local folder becomes file://, which the service resolves


def register(publish: PublishSection, uri: str) -> float:
    """POST the adapter, then wait until the service lists it and answers with it; seconds taken."""
    key = os.environ.get(publish.api_key_env)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    base_url = publish.endpoint.rstrip("/")
    started = time.monotonic()
    body = {"id": publish.adapter_id, "uri": uri, **({"base": publish.base} if publish.base else {})}
    with httpx.Client(base_url=base_url, headers=headers, timeout=publish.timeout_s + 300) as client:
        try:
            answer = client.post("/v1/adapters", json=body)
        except httpx.HTTPError as exc:
            raise PublishError(f"cannot reach the service at {base_url}: {exc}") from None
        if answer.status_code != 200:
            try:
                message = answer.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = answer.text[:500]
            raise PublishError(f"the service refused the adapter ({answer.status_code}): {message}")
        deadline = started + publish.timeout_s
        while True:  # bounded: the registry shares it with every replica at once; this confirms it
            listed = client.get("/v1/models")
            if listed.status_code == 200 and any(m["id"] == publish.adapter_id for m in listed.json()["data"]):
                reply = client.post("/v1/chat/completions", json={
                    "model": publish.adapter_id, "max_tokens": 1,
                    "messages": [{"role": "user", "content": "hi"}]})
                if reply.status_code == 200:
                    return time.monotonic() - started
            if time.monotonic() > deadline:
                raise PublishError(f"registered, but not answering as '{publish.adapter_id}' within "
                                   f"{publish.timeout_s:g} s")
            time.sleep(0.5)


def publish(cfg: FinetuneConfig, summary: dict) -> dict:
    """Gate, then register. Returns what `<run>/publish.json` records; raises PublishError if not published."""
    section = cfg.publish
    if section is None:
        raise ConfigError("the recipe has no publish section")
    run = cfg.run_location()
    uri = adapter_uri(summary)
    passed, figures, reasons = run_gate(section.gate, cfg.model.path, summary, run)
    record = {"adapter_id": section.adapter_id, "uri": uri, "endpoint": section.endpoint, "gate_passed": passed,
              "figures": figures, "reasons": reasons}
    if not passed:
        record["published"] = False
        run.join("publish.json").write_text(json.dumps(record, indent=1))
        raise PublishError("the gate refused the adapter; nothing was published: " + "; ".join(reasons), refused=True)
    record["serving_after_s"] = round(register(section, uri), 2)
    record["published"] = True
    run.join("publish.json").write_text(json.dumps(record, indent=1))
    log.info("published %s: answering %.1f s after registration", section.adapter_id, record["serving_after_s"])
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.finetune.publish", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the recipe the run was trained with, with a publish section")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides, as for jobs.finetune")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        summary_file = cfg.run_location().join("summary.json")
        if not summary_file.is_file():
            raise ConfigError(f"{summary_file.uri}: no finished run (train it first with python -m jobs.finetune)")
        record = publish(cfg, json.loads(summary_file.read_text()))
    except PublishError as exc:
        return exc.exit_code()
    except (ConfigError, storage.StorageError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
