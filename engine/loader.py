"""Load a Hugging Face checkpoint directory (local disk only): config, dtype and safetensors weights."""

from __future__ import annotations

import glob
import os

import torch
from safetensors import safe_open
from torch import nn


def load_hf_config(model_dir: str):  # -> transformers.PretrainedConfig
    """config.json of a local model directory (never the network)."""
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"model: {model_dir!r} is not a model directory (no config.json)")
    return AutoConfig.from_pretrained(model_dir, local_files_only=True)


def checkpoint_dtype(hf_config) -> torch.dtype | None:
    """The dtype the checkpoint declares (``dtype`` or ``torch_dtype``), if any."""
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def load_weights(model: nn.Module, model_dir: str) -> None:
    """Copy every checkpoint tensor into the model (each parameter's ``weight_loader`` picks this rank's shard).

    Raises ValueError on missing safetensors files, unknown tensors or parameters the checkpoint leaves unset.
    """
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"model: no *.safetensors files in {model_dir!r}")
    params = dict(model.named_parameters(remove_duplicate=False))
    packed = getattr(model, "packed_modules", {})
    tied = getattr(model, "tie_word_embeddings", False)
    owns = getattr(model, "stage_owns", lambda name: True)  # pipeline parallelism: other stages' tensors are skipped
    loaded: set[str] = set()
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight") or not owns(name):
                    continue
                target, shard = name, None
                for ckpt_module, (module, shard_id) in packed.items():
                    if f".{ckpt_module}." in name:
                        target, shard = name.replace(f".{ckpt_module}.", f".{module}."), shard_id
                        break
                param = params.get(target)
                if param is None:
                    raise ValueError(f"model: checkpoint tensor {name!r} has no place in the model")
                tensor = f.get_tensor(name)
                loader = getattr(param, "weight_loader", None)
                if loader is None:
                    param.data.copy_(tensor)
                elif shard is None:
                    loader(param, tensor)
                else:
                    loader(param, tensor, shard)
                loaded.add(target)
    missing = [n for n in params if n not in loaded and not (tied and n == "lm_head.weight")]
    if missing:
        raise ValueError(f"model: the checkpoint does not set {missing[:5]}{' ...' if len(missing) > 5 else ''}")
