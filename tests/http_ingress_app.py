"""Runs the app in its own Ray instance with the HTTP ingress mode given as argv[1], calls it with the
official OpenAI client on loopback, and prints what it saw as JSON (for tests/test_http_ingress.py).

The mode is a whole Ray instance's setting (Serve reads it when it starts), so it cannot share the test
session's cluster.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(mode: str) -> None:
    from cluster.http_ingress import serve_env
    from cluster.ports import free_port

    os.environ.update(serve_env(mode, own_instance=True))  # before Ray starts: its Serve reads the mode once
    import openai
    import psutil
    import ray
    from ray import serve

    from tests.upstream import UpstreamServer
    from serve_app.app import build_from_config
    from serve_app.config import AppConfig

    def haproxies() -> set[int]:
        return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "haproxy"}

    seen: dict = {"mode": mode}
    haproxies_before = haproxies()
    with UpstreamServer("ingress-test") as upstream:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            config = AppConfig.model_validate({"providers": [{
                "name": "upstream", "base_url": upstream.url, "models": [{"id": "echo-model", "upstream": "echo"}]}]})
            serve.run(build_from_config(config), name="ingress-test", route_prefix="/")
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
            started = time.monotonic()
            texts = []
            for _ in range(20):
                stream = client.chat.completions.create(
                    model="echo-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True)
                texts.append("".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices))
            seen["streamed"] = texts
            seen["seconds_for_20"] = round(time.monotonic() - started, 2)
            whole = client.chat.completions.create(model="echo-model", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=3)
            seen["whole"] = whole.choices[0].message.content
            try:
                client.chat.completions.create(model="echo-model", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=3, n=0)
            except openai.BadRequestError as exc:
                seen["bad_request"] = {"status": exc.status_code, "body": exc.body}
            seen["models"] = [m.id for m in client.models.list().data]
            # No keys, Serve on loopback alone, a loopback client: the admin routes answer (a laptop's
            # `make demo`). The client address the ingress sees must be the caller's in each mode.
            import httpx

            seen["admin_from_loopback"] = {route: httpx.get(f"http://127.0.0.1:{port}{route}", timeout=30).status_code
                                           for route in ("/admin/usage", "/v1/adapters", "/metrics")}
            seen["haproxy_started"] = bool(haproxies() - haproxies_before)  # by this Ray instance
            if mode == "haproxy":  # the ports HAProxy falls back to while no ingress replica is up
                from ray.serve._private.constants import RAY_SERVE_HAPROXY_CONFIG_FILE_LOC

                folder, name = os.path.split(RAY_SERVE_HAPROXY_CONFIG_FILE_LOC)  # Ray keeps one per node
                config = open(os.path.join(folder, ray.get_runtime_context().get_node_id(), name)).read()
                seen["fallback_ports"] = sorted({int(line.split()[2].rsplit(":", 1)[1]) for line in config.splitlines()
                                                 if line.strip().startswith("server ") and " backup" in line})
                seen["fallback_port_setting"] = int(os.environ["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"])
        finally:
            serve.shutdown()
            ray.shutdown()
    print("RESULT " + json.dumps(seen), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
