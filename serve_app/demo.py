"""The embedded default, end to end: fetch the model, start a local Ray head, deploy the Serve app,
wait until it is healthy, and ask it one question with the official openai client.

    python -m serve_app.demo [--config serve_app/configs/default.yaml] [--port 8000]
"""

from __future__ import annotations

import argparse
import logging
import os
import time

from cluster import local
from cluster.model_cache import ensure_default_model
from serve_app.config import DEFAULT_CONFIG, load_config

APP_NAME = "tuneserve"


def deploy(config_path: str, port: int) -> None:
    local.connect(logging_level=logging.WARNING, log_to_driver=False)
    import ray
    from ray import serve

    from serve_app.app import build_from_config

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    print("deploying the Serve app (the engine's first start takes 30-60 s on a CPU) ...", flush=True)
    started = time.monotonic()
    serve.run(build_from_config(load_config(config_path)), name=APP_NAME, route_prefix="/")
    print(f"app healthy after {time.monotonic() - started:.0f} s", flush=True)
    ray.shutdown()  # the app lives on in the cluster: Serve applications are detached


def ask(port: int, model: str) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=os.environ.get("TUNESERVE_API_KEY", "none"))
    question = "What is the capital of France?"
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                           max_tokens=64, temperature=0)
    answer = reply.choices[0].message.content
    print(f"\nQ: {question}\nA: {answer}\n   ({reply.usage.prompt_tokens} prompt + "
          f"{reply.usage.completion_tokens} completion tokens, model {reply.model})")
    return answer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serve_app.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="tuneserve app config (YAML)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of the endpoint on 127.0.0.1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    config = load_config(args.config)
    if any(model.path == "default" for model in config.models):
        print(f"default model: {ensure_default_model()}", flush=True)
    local.up()
    deploy(args.config, args.port)
    ask(args.port, config.models[0].id)
    base = f"http://127.0.0.1:{args.port}"
    print(f"\nEndpoint: {base}/v1  (models: {base}/v1/models, health: {base}/health, metrics: {base}/metrics)")
    print("Stop everything with: make down")


if __name__ == "__main__":
    main()
