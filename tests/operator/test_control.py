"""The operator's control key and the per-resource tokens derived from it (operator/control.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pypto_serving.operator.control import MIN_KEY_BYTES, engine_token, load_key


def test_tokens_are_stable_per_resource_and_differ_across_resources_and_keys() -> None:
    key = b"k" * MIN_KEY_BYTES
    token = engine_token(key, "ns1", "demo")
    assert token == engine_token(key, "ns1", "demo") and len(token) == 64 and int(token, 16) >= 0
    others = {engine_token(key, "ns2", "demo"), engine_token(key, "ns1", "demo2"), engine_token(key, "ns1/de", "mo"),
              engine_token(b"j" * MIN_KEY_BYTES, "ns1", "demo")}
    assert token not in others and len(others) == 4


def test_load_key_reads_a_file_and_names_what_is_wrong(tmp_path: Path) -> None:
    good = tmp_path / "key"
    good.write_bytes(b"\n" + b"s" * MIN_KEY_BYTES + b"\n")
    assert load_key(good) == b"s" * MIN_KEY_BYTES
    short = tmp_path / "short"
    short.write_bytes(b"s" * (MIN_KEY_BYTES - 1) + b"   \n")
    for path, message in ((short, "must hold"), (tmp_path / "missing", "cannot read"), (tmp_path, "cannot read")):
        with pytest.raises(ValueError, match=message):
            load_key(path)
    big = tmp_path / "big"
    big.write_bytes(b"s" * 5000)
    with pytest.raises(ValueError, match="must hold"):
        load_key(big)


def test_without_a_key_file_each_process_gets_a_random_key() -> None:
    first, second = load_key(None), load_key(None)
    assert len(first) >= MIN_KEY_BYTES and first != second
