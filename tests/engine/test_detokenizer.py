"""Incremental detokenization and stop strings, with real BPE tokenizers (the tiny models' and one trained here on
emoji/CJK text so that multi-byte characters are merged tokens, not only single bytes)."""

from __future__ import annotations

import copy
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pypto_serving.engine.detokenizer import IncrementalDetokenizer, TextStream
from tests.support.models import tiny_model_dir

MULTILINGUAL = ["Hello world, 你好世界! 🚀🎉 naïve café — über. こんにちは 😀👍🏽 数据中心 🇫🇷",
                "The quick brown fox 狐狸 jumps over the lazy dog 🐶. Ünïcödé ☃ ∑ ≈ ∞ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]


@pytest.fixture(scope="module")
def multilingual_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on emoji/CJK text: multi-byte characters become merged tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(MULTILINGUAL * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="module", params=["qwen3", "llama", "multilingual"])
def tokenizer(request: pytest.FixtureRequest, multilingual_tokenizer: PreTrainedTokenizerFast):
    if request.param == "multilingual":
        return multilingual_tokenizer
    return AutoTokenizer.from_pretrained(tiny_model_dir(request.param))


def stream_text(tokenizer, prompt_ids: list[int], ids: list[int]) -> tuple[str, list[str]]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = [detok.add(token_id) for token_id in ids]
    deltas.append(detok.flush())
    return "".join(deltas), deltas


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_follow_skip_special_tokens_like_a_full_decode(tokenizer, skip):
    specials = sorted(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    ids = tokenizer.encode("Hi there", add_special_tokens=False)
    ids = [specials[-1], *ids[:2], specials[0], *ids[2:], specials[-1]]
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=skip)
    text = "".join(detok.add(token_id) for token_id in ids) + detok.flush()
    assert text == tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<|" in text) is not skip


def test_special_tokens_the_config_does_not_name_are_skipped_too(multilingual_tokenizer):
    """Like Llama 3's reserved tokens: special added tokens outside all_special_ids, which a full decode drops."""
    tokenizer = copy.deepcopy(multilingual_tokenizer)
    tokenizer.backend_tokenizer.add_special_tokens(["<|reserved_0|>"])
    reserved = tokenizer.convert_tokens_to_ids("<|reserved_0|>")
    assert reserved not in tokenizer.all_special_ids and tokenizer.added_tokens_decoder[reserved].special
    ids = [reserved, *tokenizer.encode("你好 world", add_special_tokens=False), reserved]
    text, _ = stream_text(tokenizer, [], ids)
    assert text == tokenizer.decode(ids, skip_special_tokens=True) == "你好 world"


def test_merged_multibyte_tokens_exist(multilingual_tokenizer):
    ids = multilingual_tokenizer.encode("你好世界 🚀🎉")
    pieces = [multilingual_tokenizer.decode([i]) for i in ids]
    assert len(ids) < len("你好世界 🚀🎉".encode()), "expected merges of multi-byte sequences"
    assert any(len(p) >= 2 and ord(max(p)) > 0x2000 for p in pieces), pieces


def test_random_sequences_match_a_full_decode(tokenizer):
    rng = random.Random(7)
    prompt = tokenizer.encode("A prompt: 你好 🚀", add_special_tokens=False)
    for _ in range(200):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 60))]
        text, _ = stream_text(tokenizer, prompt, ids)
        assert text == tokenizer.decode(ids, skip_special_tokens=True), ids


def test_multibyte_text_streams_whole_characters(tokenizer):
    for text in MULTILINGUAL:
        ids = tokenizer.encode(text, add_special_tokens=False)
        streamed, deltas = stream_text(tokenizer, tokenizer.encode("Q: ", add_special_tokens=False), ids)
        assert streamed == text
        assert all("\ufffd" not in d for d in deltas), deltas  # never half a character on the wire


def test_window_stays_short_on_long_sequences(tokenizer):
    """No full re-decode per token: the decoded window is bounded however long the sequence gets."""
    rng = random.Random(1)
    words = ["the", "quick", "brown", "fox", "你好", "🚀", "jumps", "over", "the", "lazy", "dog"]
    ids = tokenizer.encode(" ".join(rng.choice(words) for _ in range(1500)), add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [])
    widest = 0
    for token_id in ids:
        detok.add(token_id)
        widest = max(widest, len(detok.tokens) - detok.prefix_offset)
    assert len(ids) > 1500
    assert widest <= 16


def run_stream(tokenizer, text: str, stop: list[str], include: bool = False) -> tuple[str, list[str], TextStream]:
    stream = TextStream(tokenizer, [], stop=stop, include_stop_str_in_output=include)
    sent: list[str] = []
    for token_id in tokenizer.encode(text, add_special_tokens=False):
        if stream.add(token_id):
            break
        sent.append(stream.delta(final=False))
    stream.finish()
    sent.append(stream.delta(final=True))
    return "".join(sent), sent, stream


@pytest.mark.parametrize(("text", "stop", "expected"), [
    ("Hello world. STOP and more text", ["STOP"], "Hello world. "),
    ("one two three four", [" three", "zzz"], "one two"),
    ("数据中心 你好世界 🚀 done", ["世界"], "数据中心 你好"),
    ("emoji 🚀🎉 end", ["🎉"], "emoji 🚀"),
    ("no stop here at all S", ["STOP"], "no stop here at all S"),  # held-back prefix released at the end
    ("a b a b c", ["b c", "a b a"], ""),  # the earliest occurrence wins
])
def test_stop_strings_never_leak_while_streaming(tokenizer, text, stop, expected):
    out, sent, stream = run_stream(tokenizer, text, stop)
    assert out == expected
    assert stream.stopped == (expected != text)
    prefix = ""
    for delta in sent:  # every partial output is a prefix of the final one, so nothing was ever taken back
        prefix += delta
        assert expected.startswith(prefix)
        assert not any(s in prefix for s in stop)


def test_include_stop_str_in_output(tokenizer):
    out, _, stream = run_stream(tokenizer, "Hello world. STOP and more", ["STOP"], include=True)
    assert out == "Hello world. STOP"
    assert stream.stop_reason == "STOP"


def test_partial_stop_prefix_is_held_back_then_released(multilingual_tokenizer):
    stream = TextStream(multilingual_tokenizer, [], stop=["world!"])
    for token_id in multilingual_tokenizer.encode("Hello wor", add_special_tokens=False):
        stream.add(token_id)
    assert stream.delta(final=False) == "Hello "  # "wor" could be the start of "world!"
    for token_id in multilingual_tokenizer.encode("m", add_special_tokens=False):
        stream.add(token_id)
    assert stream.delta(final=False) == "worm"
