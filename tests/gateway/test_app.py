"""Pure helpers of gateway/app.py."""

from __future__ import annotations

import math

import pytest

from pypto_serving.gateway.app import parse_json


def test_parse_json_takes_what_the_json_module_takes() -> None:
    assert parse_json(b'{"prompt": "hi", "max_tokens": 3}') == {"prompt": "hi", "max_tokens": 3}
    assert math.isnan(parse_json(b'{"temperature": NaN}')["temperature"])  # orjson refuses it; json does not
    for bad in (b'{"prompt": ', b"\xff", b""):
        with pytest.raises(ValueError):
            parse_json(bad)
