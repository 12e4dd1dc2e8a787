"""Safe defaults that need no running app: who may call the admin routes, when an app without keys may start,
which paths a caller may name, and the config mistakes refused when the app is built rather than when each
replica starts. The same rules over real HTTP: tests/test_http_ingress.py (loopback), tests/test_multinode.py
(a cluster listening beyond loopback) and tests/test_live_adapters.py (registrations)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from serve_app.auth import KeyStore, UnsafeDeployment, check_exposure, is_loopback, metrics_id
from serve_app.config import ApiKey, AppConfig, ConfigFileError, hash_key, load_config
from serve_app.protocol import APIError

ADMIN = ApiKey(name="ops", sha256=hash_key("sk-ops"), admin=True)
USER = ApiKey(name="alice", sha256=hash_key("sk-alice"))


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.8.0.3", True), ("::1", True), ("[::1]", True),
                                           ("localhost", True), ("0.0.0.0", False), ("10.1.2.3", False),
                                           ("::", False), ("", False), (None, False), ("example.org", False)])
def test_loopback_is_only_loopback(host, loopback):
    assert is_loopback(host) is loopback


def _admin_status(store: KeyStore, key: ApiKey | None, client: str | None) -> int:
    try:
        store.require_admin(key, client, "manage adapters")
    except APIError as exc:
        return exc.status_code
    return 200


def test_admin_routes_need_an_admin_key_except_loopback_on_a_loopback_listener():
    laptop = KeyStore([], loopback_only=True)
    assert _admin_status(laptop, None, "127.0.0.1") == 200
    assert _admin_status(laptop, None, "::1") == 200
    assert _admin_status(laptop, None, "10.0.0.7") == 403  # another host reached a loopback-only listener?
    assert _admin_status(laptop, None, None) == 403
    # listening beyond loopback (allow_unauthenticated): nobody, loopback clients included
    exposed = KeyStore([], loopback_only=False)
    assert _admin_status(exposed, None, "127.0.0.1") == 403
    # with keys, only an admin key; a loopback client without one is no exception
    keyed = KeyStore([ADMIN, USER], loopback_only=True)
    assert _admin_status(keyed, ADMIN, "10.0.0.7") == 200
    assert _admin_status(keyed, USER, "127.0.0.1") == 403
    assert _admin_status(keyed, None, "127.0.0.1") == 403


def test_an_app_without_keys_listens_on_loopback_alone_unless_the_operator_opts_out(caplog):
    check_exposure([], "127.0.0.1", allow_unauthenticated=False)
    check_exposure([ADMIN], "0.0.0.0", allow_unauthenticated=False)
    for host in ("0.0.0.0", "10.1.2.3", None):  # None: the host could not be read, so it is not trusted
        with pytest.raises(UnsafeDeployment, match="Add a key under ingress.api_keys"):
            check_exposure([], host, allow_unauthenticated=False)
    with caplog.at_level("WARNING", logger="tuneserve.auth"):
        check_exposure([], "0.0.0.0", allow_unauthenticated=True)
    assert "allow_unauthenticated" in caplog.text


def test_metrics_name_keys_by_an_alias_never_by_name():
    assert metrics_id(None) == "anonymous"
    assert metrics_id(USER) == f"key-{hash_key('sk-alice')[:8]}" and "alice" not in metrics_id(USER)
    assert metrics_id(ApiKey(name="alice", sha256=hash_key("k"), metrics_id="team-a")) == "team-a"
    resolved = ApiKey(name="env-key", env="TUNESERVE_TEST_KEY_X", admin=True)
    os.environ["TUNESERVE_TEST_KEY_X"] = "sk-x"
    try:
        done = resolved.resolved()
    finally:
        del os.environ["TUNESERVE_TEST_KEY_X"]
    assert done.sha256 == hash_key("sk-x") and done.env is None and done.metrics_id == f"key-{hash_key('sk-x')[:8]}"
    with pytest.raises(ValueError, match="TUNESERVE_TEST_KEY_X is not set"):
        resolved.resolved()


# -- paths a caller may name -----------------------------------------------------------------------------


@pytest.fixture
def storage_tree(tmp_path, monkeypatch) -> dict[str, Path]:
    """A storage root with an adapter in it, and an adapter outside it reached through a link inside."""
    root, outside = tmp_path / "storage", tmp_path / "elsewhere"
    (root / "runs" / "a" / "adapter").mkdir(parents=True)
    (root / "runs" / "a" / "adapter" / "adapter_config.json").write_text("{}")
    (outside / "adapter").mkdir(parents=True)
    (outside / "adapter" / "adapter_config.json").write_text("{}")
    (root / "runs" / "escape").symlink_to(outside / "adapter")
    (root / "runs" / "sneaky").mkdir()
    (root / "runs" / "sneaky" / "adapter_config.json").symlink_to(outside / "adapter" / "adapter_config.json")
    monkeypatch.setenv("TUNESERVE_STORAGE", f"file://{root}")
    return {"root": root, "outside": outside}


def test_caller_paths_stay_under_the_allowed_roots(storage_tree):
    from cluster.storage import NotAllowed, confined

    root, outside = storage_tree["root"], storage_tree["outside"]
    inside = f"file://{root}/runs/a/adapter"
    assert confined("runs/a/adapter").uri == inside
    assert confined(inside).uri == inside
    assert confined(str(root / "runs/a/adapter")).uri == inside
    refused = ["file:///etc", "/etc", "runs/../../elsewhere/adapter", f"file://{root}/runs/a/../../../elsewhere/adapter",
               "runs/escape", "runs/sneaky", "runs/not-there", f"file://{outside}/adapter", "s3://bucket/adapter",
               "ftp://x/y", "runs\\..\\..\\etc"]
    messages = set()
    for path in refused:
        with pytest.raises(NotAllowed) as caught:
            confined(path)
        messages.add(str(caught.value).replace(path[:300], "<path>"))
    assert messages == {"<path>: not found, or outside the storage this service may read"}  # one answer for all
    # another root, when the operator allows it
    assert confined(f"file://{outside}/adapter", [str(outside)]).uri == f"file://{outside}/adapter"
    with pytest.raises(NotAllowed):
        confined(inside, [str(outside)])


# -- refused when the app is built -------------------------------------------------------------------------


def test_yaml_errors_name_file_line_and_column(tmp_path):
    path = tmp_path / "app.yaml"
    path.write_text("models:\n  - id: a\n    path: [unclosed\n")
    with pytest.raises(ConfigFileError, match=rf"^{path}:4:1: invalid YAML: "):
        load_config(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigFileError, match="must be a YAML mapping"):
        load_config(path)


def _adapter(folder: Path, config: dict | None) -> str:
    folder.mkdir(parents=True)
    if config is not None:
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("case,needle", [
    ("model-missing", "the local folder /no/such/model does not exist"),
    ("adapter-missing", "gone does not exist on this node"),
    ("no-config", "no readable adapter_config.json"),
    ("no-r", "needs 'r', the LoRA rank, as a positive integer (it has None)"),
    ("r-text", "(it has 'x')"),
    ("r-list", "(it has [8])"),
    ("r-bool", "(it has True)"),
    ("r-zero", "(it has 0)"),
])
def test_model_and_adapter_folders_are_checked_at_build(tmp_path, monkeypatch, case, needle):
    from serve_app.app import check_storage_paths

    model = {"id": "m", "path": "default"}
    adapter_config = {"peft_type": "LORA", "r": 8}
    if case == "model-missing":
        model["path"] = "/no/such/model"
    elif case == "adapter-missing":
        model["adapters"] = [{"id": "a", "path": str(tmp_path / "gone")}]
    else:
        config = {"no-config": None, "no-r": {"peft_type": "LORA"}, "r-text": {**adapter_config, "r": "x"},
                  "r-list": {**adapter_config, "r": [8]}, "r-bool": {**adapter_config, "r": True},
                  "r-zero": {**adapter_config, "r": 0}}[case]
        model["adapters"] = [{"id": "a", "path": _adapter(tmp_path / "a", config)}]
    with pytest.raises(ValueError) as caught:
        check_storage_paths(AppConfig.model_validate({"models": [model]}))
    assert needle in str(caught.value)
    # the same app with a good adapter builds, named absolutely or relative to the project folder
    good = {"id": "m", "path": "default", "adapters": [{"id": "a", "path": _adapter(tmp_path / "ok", adapter_config)}]}
    check_storage_paths(AppConfig.model_validate({"models": [good]}))
    monkeypatch.setenv("TUNESERVE_PROJECT", str(tmp_path))
    _adapter(tmp_path / "runs" / "x" / "adapter", adapter_config)
    relative = {"id": "m", "path": "default", "adapters": [{"id": "a", "path": "runs/x/adapter"}]}
    check_storage_paths(AppConfig.model_validate({"models": [relative]}))


@pytest.mark.parametrize("setting,needle", [
    ({"engine_kwargs": {"enforce_eagr": True}}, "engine_kwargs.enforce_eagr is not an engine argument of vLLM"),
    ({"engine_kwargs": {"enforce_eagr": True}}, "did you mean 'enforce_eager'?"),
    ({"tool_parser": "hermez"}, "tool_parser 'hermez' is not one of vLLM"),
    ({"tool_parser": "hermez"}, "hermes"),
    ({"reasoning_parser": "deepseek-r1"}, "reasoning_parser 'deepseek-r1'"),
])
def test_engine_settings_are_checked_against_vllm_at_build(setting, needle):
    from serve_app.app import check_engine_settings

    with pytest.raises(ValueError) as caught:
        check_engine_settings(AppConfig.model_validate({"models": [{"id": "m", **setting}]}))
    assert needle in str(caught.value)


def test_the_shipped_settings_pass_the_build_checks():
    from serve_app.app import check_engine_settings
    from serve_app.config import DEFAULT_CONFIG

    check_engine_settings(load_config(DEFAULT_CONFIG))
    check_engine_settings(AppConfig.model_validate({"models": [{"id": "m", "tool_parser": "llama3_json",
                                                                "reasoning_parser": "deepseek_r1"}]}))
