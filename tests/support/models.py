"""Shared test fixtures: tiny HF models (owned by the engine core; see docs/architecture.md, "Engine core").

`tiny_model_dir(arch)` generates each tiny random-weight model once into ``$PYPTO_CACHE_DIR/models/`` (keyed by
architecture, seed, sizes and the generator version) and reuses it across sessions and processes.
"""

from __future__ import annotations

import fcntl
import functools
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.support.common import CACHE_DIR

MODELS_DIR = CACHE_DIR / "models"


def tiny_model_dir(arch: str = "qwen3", seed: int = 0, dtype: str = "float32", **sizes: int) -> Path:
    """Return the directory of the tiny ``arch`` model (qwen3|qwen2|llama), generating it on first use.

    ``sizes`` override the defaults of `pypto-serving tiny-model` (layers, hidden, heads, kv_heads, intermediate,
    vocab, head_dim, max_position). Safe to call from several processes at once (a file lock guards generation).
    """
    from pypto_serving.engine import tiny_model

    merged = {**tiny_model.DEFAULT_SIZES, **sizes}
    key = "-".join([arch, f"s{seed}", dtype, *(f"{k}{v}" for k, v in sorted(merged.items())),
                    f"g{tiny_model.GENERATOR_VERSION}"])
    path = MODELS_DIR / key
    if (path / "model.safetensors").exists():
        return path
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    with open(MODELS_DIR / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "model.safetensors").exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=MODELS_DIR))
            try:
                tiny_model.write_tiny_model(tmp, arch, seed=seed, dtype=dtype, **merged)
                shutil.rmtree(path, ignore_errors=True)
                tmp.rename(path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return path


@pytest.fixture(scope="session")
def tiny_qwen3_dir() -> Path:
    """The default tiny Qwen3 model (2 layers, hidden 64, vocab 1024)."""
    return tiny_model_dir("qwen3")


@pytest.fixture(scope="session")
def tiny_qwen2_dir() -> Path:
    """The default tiny Qwen2 model (qkv bias, tied embeddings)."""
    return tiny_model_dir("qwen2")


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    """The default tiny Llama model (llama3 rope scaling, BOS token)."""
    return tiny_model_dir("llama")


@functools.lru_cache(maxsize=8)
def hf_model(model_dir: str):  # -> transformers PreTrainedModel
    """The model loaded by `transformers` in float32 (cached per directory): the reference implementation."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # generate() fills an unset eos_token_id from the checkpoint's generation_config.json: clear it so EOS is
    # really ignored (the engine's outputs it is compared with use ignore_eos)
    model.generation_config.eos_token_id = None
    return model


@functools.lru_cache(maxsize=4096)
def _hf_greedy(model_dir: str, prompt_ids: tuple[int, ...], max_new_tokens: int) -> tuple[int, ...]:
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        out = hf_model(model_dir).generate(torch.tensor([prompt_ids]), generation_config=config)
    return tuple(out[0, len(prompt_ids):].tolist())


def hf_greedy(model_dir: str | Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The `transformers` reference: greedy float32 generation of exactly ``max_new_tokens`` (EOS ignored)."""
    return list(_hf_greedy(str(model_dir), tuple(prompt_ids), max_new_tokens))
