"""The README's commands stay true. Fast checks of its shell blocks here; the cluster block also runs, as
written, in tests/test_multinode.py, and `make test` is what CI runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests import readme

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_the_two_commands_are_make_targets_and_ci_runs_the_second():
    assert readme.shell_blocks()[0] == ["make demo", "make test"]
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert (REPO_ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == "make test"


def test_the_parser_joins_continuations_and_drops_comments(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```bash\nls -l \\\n    /tmp   # the list\necho 'a # b'  # said\n```\n```\nnot: shell\n```\n")
    assert readme.shell_blocks(page) == [["ls -l /tmp", "echo 'a # b'"]]


@pytest.mark.parametrize("containing", ["jobs.finetune --config jobs/configs/assistant_cpu.yaml publish",
                                        "cluster.local up"])
def test_each_fine_tune_reads_only_what_the_commands_before_it_made(containing, tmp_path, monkeypatch):
    """Runs the block's `python -m jobs.data` commands as written (into a storage root of its own), then
    loads each fine-tune command's recipe with its overrides: every data file the recipe reads must exist."""
    from cluster.storage import locate
    from jobs.data.__main__ import main as make_data
    from jobs.finetune.config import check_supported, load_config

    monkeypatch.setenv("TUNESERVE_STORAGE", f"file://{tmp_path}")
    monkeypatch.chdir(REPO_ROOT)
    finetunes = 0
    for command in readme.block(containing):
        words = shlex.split(command) if not command.startswith(("eval ", "source ")) else []
        if words[:3] == ["python", "-m", "jobs.data"]:
            assert make_data(words[3:]) == 0, command
        if "jobs.finetune" in words:
            args = words[words.index("jobs.finetune") + 1:]
            assert args[0] == "--config", command
            cfg = load_config(args[1], args[2:])
            check_supported(cfg)
            reads = [*cfg.data.train, *cfg.loss.distill_prompts]
            if cfg.publish is not None and cfg.publish.gate.heldout:
                reads.append(cfg.publish.gate.heldout)
            missing = [path for path in reads if not locate(path).is_file()]
            assert not missing, f"{command}\nreads {missing}, which no command before it makes"
            finetunes += 1
    assert finetunes == 1


def test_the_publish_loop_targets_the_demo_endpoint():
    """The loop publishes to the app `make demo` starts, and asks the adapter id it published."""
    loop = readme.block("publish.endpoint=")
    finetune = readme.command(loop, "jobs.finetune")
    endpoint = re.search(r"publish\.endpoint=(\S+)", finetune)[1]
    adapter = re.search(r"publish\.adapter_id=(\S+)", finetune)[1]
    assert f"Endpoint: {endpoint}/v1" in (REPO_ROOT / "README.md").read_text()
    assert f'"model": "{adapter}"' in readme.command(loop, "curl")


def test_every_config_a_command_names_exists_and_parses(monkeypatch):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve_app.config import load_config

    monkeypatch.setenv("TUNESERVE_ADMIN_KEY", "sk-admin-test")
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-test")
    named = 0
    for block in readme.shell_blocks():
        for command in block:
            for found in re.finditer(r"(?:serve (?:deploy|run) |config=)(serve_app/configs/\S+\.yaml)", command):
                path = REPO_ROOT / found[1]
                assert path.is_file(), command
                config = yaml.safe_load(path.read_text())
                if "applications" in config:  # a Serve config: its app config too
                    ServeDeploySchema.model_validate(config)
                    path = REPO_ROOT / config["applications"][0]["args"]["config"]
                load_config(path)
                named += 1
    assert named >= 2
