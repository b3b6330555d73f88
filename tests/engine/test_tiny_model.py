"""`pypto-serving tiny-model`: HF-format output that transformers loads, deterministic per seed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pypto_serving.cli import main as cli_main
from tests.support.models import tiny_model_dir

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def _digest(path: Path) -> dict[str, str]:
    return {f: hashlib.sha256((path / f).read_bytes()).hexdigest() for f in FILES}


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_cli_writes_a_model_transformers_loads(tmp_path: Path, arch: str) -> None:
    out = tmp_path / "m"
    assert cli_main(["tiny-model", str(out), "--arch", arch, "--layers", "1", "--hidden", "32", "--heads", "2",
                     "--kv-heads", "1", "--intermediate", "48", "--vocab", "600", "--seed", "3"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    cfg = AutoConfig.from_pretrained(out)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (arch, 1, 32, 600)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.architectures[0].lower().startswith(arch)
    tok = AutoTokenizer.from_pretrained(out)
    assert 500 < len(tok) <= 600
    text = "Hello, world! The quick brown fox."
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert len(ids) <= len(text) / 2  # real merges, not bytes
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert "Hi" in chat and "assistant" in chat
    gen = json.loads((out / "generation_config.json").read_text())
    assert tok.eos_token_id in gen["eos_token_id"]
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 600) and torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_every_special_token_is_named_so_the_stock_skip_path_drops_it(arch: str) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir(arch))
    assert set(tok.all_special_ids) == {i for i, t in tok.added_tokens_decoder.items() if t.special}
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    chat = tok.encode(text, add_special_tokens=False)
    kept = tok.convert_ids_to_tokens(chat, skip_special_tokens=True)  # what vLLM-style detokenizers use
    assert not [t for t in kept if t.startswith("<|")]
    assert tok.convert_tokens_to_string(kept) == tok.decode(chat, skip_special_tokens=True)
    assert "user" in tok.decode(chat, skip_special_tokens=True)


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    args = ["--arch", "qwen3", "--layers", "1", "--hidden", "32", "--heads", "2", "--kv-heads", "1",
            "--intermediate", "48", "--vocab", "600"]
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert cli_main(["tiny-model", str(tmp_path / name), *args, "--seed", seed]) == 0
    a, b, c = (_digest(tmp_path / n) for n in "abc")
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"]
    assert a["tokenizer.json"] == c["tokenizer.json"]


def test_rejects_bad_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main(["tiny-model", str(tmp_path / "x"), "--heads", "4", "--kv-heads", "3"])
    assert "--kv-heads" in capsys.readouterr().err


def test_tiny_model_dir_generates_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tests.support import models

    monkeypatch.setattr(models, "MODELS_DIR", tmp_path)
    first = tiny_model_dir("llama", seed=5, layers=1, hidden=32, heads=2, kv_heads=1, intermediate=48, vocab=600)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = tiny_model_dir("llama", seed=5, layers=1, hidden=32, heads=2, kv_heads=1, intermediate=48, vocab=600)
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns == stamp
    other = tiny_model_dir("llama", seed=6, layers=1, hidden=32, heads=2, kv_heads=1, intermediate=48, vocab=600)
    assert other != first and other.parent == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted([first.name, other.name])


@pytest.mark.parametrize(("arch", "model_type"), [("qwen3-moe", "qwen3_moe"), ("qwen2-moe", "qwen2_moe")])
def test_cli_writes_moe_models_with_real_checkpoint_names(tmp_path: Path, arch: str, model_type: str) -> None:
    from safetensors import safe_open

    out = tmp_path / "m"
    assert cli_main(["tiny-model", str(out), "--arch", arch, "--layers", "1", "--experts", "4", "--top-k", "2",
                     "--moe-intermediate", "16", "--shared-intermediate", "24", "--seed", "3"]) == 0
    cfg = AutoConfig.from_pretrained(out)
    assert (cfg.model_type, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (
        model_type, 4, 2, 16)
    assert cfg.norm_topk_prob is (arch == "qwen3-moe")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert {"model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.3.down_proj.weight"} <= names
    assert ("model.layers.0.mlp.shared_expert_gate.weight" in names) is (arch == "qwen2-moe")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == cfg.architectures[0]
    assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()
