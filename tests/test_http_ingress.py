"""The two HTTP ingress modes (cluster/http_ingress.py HTTP_INGRESS_MODES): the app answers the same through
Serve's proxy and through HAProxy with direct ingress, streamed, whole and with an OpenAI-format 400.
Each mode runs in its own Ray instance (tests/http_ingress_app.py), since Serve reads it when it starts."""

import json
import os
import subprocess
import sys

import pytest

from cluster.http_ingress import HTTP_INGRESS_MODES, http_ingress_mode


# The session's settings for reaching its own cluster; the app here starts a Ray instance of its own.
_SESSION_CLUSTER_ENV = {"RAY_ADDRESS", "RAY_DASHBOARD_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"}


def _run_app(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _SESSION_CLUSTER_ENV}
    done = subprocess.run([sys.executable, "-m", "tests.http_ingress_app", mode], capture_output=True, text=True,
                          timeout=300, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"the app in {mode} mode failed:\n{done.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("mode", list(HTTP_INGRESS_MODES))
def test_the_app_answers_in_each_http_ingress_mode(mode):
    seen = _run_app(mode)
    assert seen["streamed"] == ["tok0 tok1 tok2 tok3 "] * 20
    assert seen["whole"] == "tok0 tok1 tok2 "
    assert seen["bad_request"]["status"] == 400
    assert seen["bad_request"]["body"]["param"] == "n"
    assert seen["bad_request"]["body"]["type"] == "invalid_request_error"
    assert seen["models"] == ["echo-model"]
    assert seen["admin_from_loopback"] == {"/admin/usage": 200, "/v1/adapters": 200, "/metrics": 200}
    # HAProxy serves the port only in its own mode: a proxy-mode cluster must not start one.
    assert seen["haproxy_started"] is (mode == "haproxy")
    if mode == "haproxy":
        # Serve's fallback proxy binds with SO_REUSEPORT: at Ray's fixed default (8500) it would share the
        # port with any other Ray instance on the host, the session's cluster included, and HAProxy would
        # hand requests to the other instance's app while no replica of its own is up.
        assert seen["fallback_ports"] == [seen["fallback_port_setting"]]
        assert seen["fallback_port_setting"] != 8500


def test_an_unknown_http_ingress_mode_is_refused(monkeypatch):
    monkeypatch.setenv("TUNESERVE_HTTP_INGRESS", "nginx")
    with pytest.raises(ValueError, match="TUNESERVE_HTTP_INGRESS='nginx': choose one of proxy, haproxy"):
        http_ingress_mode()
