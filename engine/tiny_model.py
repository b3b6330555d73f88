"""`pypto-serving tiny-model OUT --arch qwen3|qwen2|llama|qwen3-moe|qwen2-moe`: a tiny random-weight model in HF format.

The output directory holds config.json, model.safetensors, tokenizer.json, tokenizer_config.json (with a jinja
chat template) and generation_config.json, so both this engine and `transformers.AutoModelForCausalLM` /
`AutoTokenizer` load it. The tokenizer is a real byte-level BPE trained offline on built-in English-ish text.
Everything is deterministic for a given seed and size; nothing touches the network. The MoE archs write the
per-expert tensor names of real Qwen3-MoE / Qwen1.5-MoE checkpoints (``mlp.experts.<e>.gate_proj.weight``, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path

# Bump whenever the bytes written for the same arguments change (tests key their model cache on it).
GENERATOR_VERSION = 2  # 2: every special token is named in tokenizer_config.json (additional_special_tokens)

ARCHS = ("qwen3", "qwen2", "llama", "qwen3-moe", "qwen2-moe")
ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
                 "qwen3-moe": "Qwen3MoeForCausalLM", "qwen2-moe": "Qwen2MoeForCausalLM"}
MODEL_TYPES = {"qwen3-moe": "qwen3_moe", "qwen2-moe": "qwen2_moe"}  # others: the arch name
DEFAULT_SIZES = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab": 1024}
# MoE archs only: routed experts, experts per token, expert and shared-expert (qwen2-moe) intermediate sizes
MOE_SIZES = {"experts": 8, "top_k": 2, "moe_intermediate": 32, "shared_intermediate": 64}

_ENGLISH = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Once upon a time, in a small village by the sea, there lived an old fisherman and his curious granddaughter.
Every morning they walked down to the harbor, counted the boats and talked about the weather, the tides and
the stars. "Why is the sky blue?" she asked. "Because the air scatters the blue light of the sun," he said.
Kubernetes schedules pods onto nodes; an operator watches custom resources and reconciles the cluster state.
The serving engine batches requests continuously, caches key and value tensors in blocks, and streams tokens.
Hello, world! How are you today? I am fine, thank you. What is your name? My name is Ada, and I like tea.
Machine learning models predict the next token from the previous ones. Large language models are trained on
books, articles, code and conversations. They answer questions, write stories, translate and summarize text.
Please write a short poem about the autumn leaves falling in the quiet park near the river.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2048 3.14159 2.71828 1,000,000 and 2025-01-01.
def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i * i)\n
Science explains the world with experiments; history remembers people, places, wars, kings and inventions.
The weather is sunny with a light breeze; tomorrow it will rain in the north and snow in the mountains.
She opened the door, looked at the garden, picked a red apple from the tree and smiled at the morning light.
Water boils at one hundred degrees Celsius at sea level, and freezes at zero degrees.
"""
_SYLLABLES = ("ka", "lo", "mi", "ter", "an", "sil", "ro", "ve", "den", "qua", "zor", "pel", "ith", "un", "bra",
              "cho", "fen", "gli", "hu", "jas", "nor", "ost", "pri", "sa", "tro", "ul", "vin", "wex", "yal", "zu")
_WORDS = _ENGLISH.replace("\n", " ").split()


def training_corpus() -> list[str]:
    """Return the built-in tokenizer training text: English plus pseudo-words (fixed, independent of the seed)."""
    rng = random.Random(1234)
    lines = _ENGLISH.splitlines()
    pseudo = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(3000)]
    for _ in range(1500):
        words = [rng.choice(_WORDS) if rng.random() < 0.6 else rng.choice(pseudo) for _ in range(rng.randint(6, 16))]
        lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ",", ";"]))
    return lines


def _chat_template(arch: str) -> str:
    if arch == "llama":
        return (
            "{{ bos_token }}{% for message in messages %}"
            "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] }}"
            "{{ '<|eot_id|>' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
            "{% endif %}"
        )
    return (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


def build_tokenizer(arch: str, vocab: int):  # -> tokenizers.Tokenizer
    """Train the byte-level BPE tokenizer (deterministic) and return it with its special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = (["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
                if arch == "llama" else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    if arch == "llama":
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _special_ids(arch: str, tok) -> dict:
    if arch == "llama":
        ids = {name: tok.token_to_id(t) for name, t in
               (("bos", "<|begin_of_text|>"), ("eos", "<|eot_id|>"), ("end", "<|end_of_text|>"))}
        return {"bos": ids["bos"], "eos": [ids["eos"], ids["end"]], "pad": ids["end"],
                "tokens": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>"}}
    end, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    return {"bos": None, "eos": [im_end, end], "pad": end,
            "tokens": {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}}


def model_config(arch: str, sizes: dict, special: dict, dtype: str, tie: bool) -> dict:
    """Return config.json for the architecture, in the shape real checkpoints use."""
    head_dim = sizes.get("head_dim") or sizes["hidden"] // sizes["heads"]
    cfg = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": MODEL_TYPES.get(arch, arch),
        "vocab_size": sizes["vocab"],
        "hidden_size": sizes["hidden"],
        "intermediate_size": sizes["intermediate"],
        "num_hidden_layers": sizes["layers"],
        "num_attention_heads": sizes["heads"],
        "num_key_value_heads": sizes["kv_heads"],
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": sizes.get("max_position", 4096),
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tie,
        "bos_token_id": special["bos"],
        "eos_token_id": special["eos"][0],
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if arch.endswith("-moe"):
        cfg.update(num_experts=sizes["experts"], num_experts_per_tok=sizes["top_k"],
                   moe_intermediate_size=sizes["moe_intermediate"], norm_topk_prob=arch == "qwen3-moe",
                   decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=False)
        if arch == "qwen2-moe":
            cfg["shared_expert_intermediate_size"] = sizes["shared_intermediate"]
    if arch in ("qwen3", "qwen3-moe"):
        cfg.update(rope_theta=1000000.0, attention_bias=False, use_sliding_window=False, attention_dropout=0.0)
    elif arch in ("qwen2", "qwen2-moe"):
        cfg.update(rope_theta=1000000.0, use_sliding_window=False, attention_dropout=0.0)
    else:
        cfg.update(rope_theta=500000.0, attention_bias=False, mlp_bias=False, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024})
    return cfg


def random_weights(arch: str, sizes: dict, seed: int, tie: bool):  # -> dict[str, torch.Tensor]
    """Seeded random weights with unit-scale activations and well-separated logits (stable greedy choices)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    hidden, inter, vocab = sizes["hidden"], sizes["intermediate"], sizes["vocab"]
    head_dim = sizes.get("head_dim") or hidden // sizes["heads"]
    q_dim, kv_dim = sizes["heads"] * head_dim, sizes["kv_heads"] * head_dim

    def normal(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std + mean

    out_std = 1.0 / math.sqrt(2 * sizes["layers"])
    w = {"model.embed_tokens.weight": normal(vocab, hidden, std=1.0)}
    for i in range(sizes["layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = normal(hidden, std=0.1, mean=1.0)
        w[p + "post_attention_layernorm.weight"] = normal(hidden, std=0.1, mean=1.0)
        for name, dim in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)):
            w[p + f"self_attn.{name}.weight"] = normal(dim, hidden, std=1.0 / math.sqrt(hidden))
            if arch in ("qwen2", "qwen2-moe"):
                w[p + f"self_attn.{name}.bias"] = normal(dim, std=0.1)
        w[p + "self_attn.o_proj.weight"] = normal(hidden, q_dim, std=out_std / math.sqrt(q_dim))
        if arch in ("qwen3", "qwen3-moe"):
            w[p + "self_attn.q_norm.weight"] = normal(head_dim, std=0.1, mean=1.0)
            w[p + "self_attn.k_norm.weight"] = normal(head_dim, std=0.1, mean=1.0)
        mlps = [("mlp.", inter)]
        if arch.endswith("-moe"):
            # a router with logits of unit scale (well-separated top-k), then each expert as its own SwiGLU MLP
            w[p + "mlp.gate.weight"] = normal(sizes["experts"], hidden, std=1.0 / math.sqrt(hidden))
            mlps = [(f"mlp.experts.{e}.", sizes["moe_intermediate"]) for e in range(sizes["experts"])]
            if arch == "qwen2-moe":
                mlps.append(("mlp.shared_expert.", sizes["shared_intermediate"]))
                w[p + "mlp.shared_expert_gate.weight"] = normal(1, hidden, std=1.0 / math.sqrt(hidden))
        for prefix, size in mlps:
            w[p + prefix + "gate_proj.weight"] = normal(size, hidden, std=1.0 / math.sqrt(hidden))
            w[p + prefix + "up_proj.weight"] = normal(size, hidden, std=1.0 / math.sqrt(hidden))
            w[p + prefix + "down_proj.weight"] = normal(hidden, size, std=out_std / math.sqrt(size))
    # random signs on the final norm: no systematic "predict the input token again" bias when embeddings are tied
    w["model.norm.weight"] = normal(hidden, std=1.0)
    if tie:
        w["model.embed_tokens.weight"] *= 2.5 / math.sqrt(hidden)
    else:
        w["lm_head.weight"] = normal(vocab, hidden, std=2.5 / math.sqrt(hidden))
    return w


def write_tiny_model(out: str | os.PathLike, arch: str, seed: int = 0, dtype: str = "float32",
                     tie_word_embeddings: bool | None = None, **sizes: int) -> Path:
    """Write the model into ``out`` (created; an existing directory's files are overwritten) and return its path."""
    import torch
    from safetensors.torch import save_file

    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    sizes = {**DEFAULT_SIZES, **MOE_SIZES, **{k: v for k, v in sizes.items() if v is not None}}
    if sizes["heads"] % sizes["kv_heads"]:
        raise ValueError("--heads must be a multiple of --kv-heads")
    tie = (arch == "qwen2") if tie_word_embeddings is None else tie_word_embeddings
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    tok = build_tokenizer(arch, sizes["vocab"])
    if tok.get_vocab_size() > sizes["vocab"]:
        raise ValueError(f"--vocab {sizes['vocab']} is smaller than the tokenizer's {tok.get_vocab_size()} tokens")
    tok.save(str(out / "tokenizer.json"))
    special = _special_ids(arch, tok)
    specials = [t for t in sorted(tok.get_vocab(), key=tok.token_to_id) if t.startswith("<|")]
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in specials}
    # the chat markers too, as real Qwen / Llama configs do, so `all_special_ids` (and with it
    # skip_special_tokens in convert_ids_to_tokens) covers every special token, not only bos/eos/pad
    named = set(special["tokens"].values())
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added,
               **special["tokens"], "additional_special_tokens": [t for t in specials if t not in named],
               "chat_template": _chat_template(arch), "clean_up_tokenization_spaces": False,
               "model_max_length": sizes.get("max_position", 4096), "add_bos_token": arch == "llama"}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")

    config = model_config(arch, sizes, special, dtype, tie)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen_cfg = {"bos_token_id": special["bos"], "eos_token_id": special["eos"], "pad_token_id": special["pad"],
               "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")

    weights = random_weights(arch, sizes, seed, tie)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    save_file({k: v.to(torch_dtype).contiguous() for k, v in weights.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


def main(argv: list[str]) -> int:
    """Entry point of `pypto-serving tiny-model`."""
    parser = argparse.ArgumentParser(prog="pypto-serving tiny-model", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output directory (HF format)")
    parser.add_argument("--arch", choices=ARCHS, default="qwen3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    for name, default in DEFAULT_SIZES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default, dest=name)
    for name, default in MOE_SIZES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default, dest=name,
                            help="MoE archs only")
    parser.add_argument("--head-dim", type=int, default=None, help="default: hidden / heads")
    parser.add_argument("--max-position", type=int, default=4096, help="max_position_embeddings")
    parser.add_argument("--tie-word-embeddings", action=argparse.BooleanOptionalAction, default=None,
                        help="default: tied for qwen2 only")
    args = parser.parse_args(argv)
    sizes = {name: getattr(args, name) for name in (*DEFAULT_SIZES, *MOE_SIZES)}
    # write next to the target and rename, so a reader never sees a half-written model
    out = Path(args.out)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent if out.parent.exists() else None))
    try:
        write_tiny_model(tmp, args.arch, seed=args.seed, dtype=args.dtype, tie_word_embeddings=args.tie_word_embeddings,
                         head_dim=args.head_dim, max_position=args.max_position, **sizes)
        out.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            shutil.move(str(f), out / f.name)
    except ValueError as exc:
        parser.error(str(exc))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {args.arch} tiny model to {out}")
    return 0
