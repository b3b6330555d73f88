"""`pypto-serving bench`: a serving load generator in the spirit of `vllm bench serve`.

Pure asyncio + httpx (no torch): it sends streamed OpenAI requests to an engine or the gateway at a Poisson
`--request-rate` (or all at once, bounded by `--max-concurrency`), with `ignore_eos` so output lengths are exact,
and reports throughput and p50/p90/p99 of TTFT, TPOT, ITL and end-to-end latency. Datasets are generated from a
fixed `--seed`: `random` (input/output lengths around a mean, or in a range) and `shared-prefix` (groups of
prompts sharing a long prefix, for prefix caching and prefix-aware routing). Token counts come from the server's
usage; prompts are sized with `--tokenizer DIR` (tokenizer.json) or, without one, a rough 4-chars-per-token guess.

As a library::

    from pypto_serving.engine.bench import run_benchmark
    result = run_benchmark(base_url="http://127.0.0.1:8000", model="tiny", num_prompts=50, max_concurrency=8)
    result["output_throughput"], result["ttft_ms"]["p99"]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

WORDS = ("time", "person", "year", "way", "day", "thing", "world", "life", "hand", "part", "child", "eye", "place",
         "work", "week", "case", "point", "number", "group", "problem", "fact", "river", "mountain", "cloud", "engine",
         "token", "block", "cache", "batch", "model", "serve", "route", "node", "apple", "table", "light", "water")
CHARS_PER_TOKEN = 4


@dataclass
class BenchRequest:
    """One request of a dataset."""

    prompt: str
    prompt_len: int  # tokens, as the tokenizer (or the estimate) counts them
    output_len: int


@dataclass
class RequestResult:
    """What one request measured."""

    ok: bool = False
    error: str = ""
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0


@dataclass
class BenchConfig:
    """Everything a run needs; `run_benchmark(**fields)` takes the same names."""

    base_url: str
    model: str
    endpoint: str = "completions"  # completions | chat
    num_prompts: int = 100
    request_rate: float = math.inf  # requests/s, Poisson arrivals; inf: all at once
    max_concurrency: int | None = None
    dataset: str = "random"  # random | shared-prefix
    random_input_len: str = "128"  # "N" (around N, see random_range_ratio) or "LO:HI"
    random_output_len: str = "32"
    random_range_ratio: float = 0.0
    shared_prefix_groups: int = 4
    shared_prefix_len: int = 256
    shared_suffix_len: int = 32
    seed: int = 0
    tokenizer: str | None = None  # a directory with tokenizer.json
    headers: dict[str, str] = field(default_factory=dict)
    api_key: str | None = None
    temperature: float = 0.0
    timeout_s: float = 600.0
    progress: bool = True


# ------------------------------------------------------------------------------------------------- datasets


class PromptMaker:
    """Makes prompts of a given token length: from the tokenizer's vocabulary, or words sized by characters."""

    def __init__(self, rng: random.Random, tokenizer_dir: str | None) -> None:
        self.rng = rng
        self.tokenizer: Any = None
        if tokenizer_dir:
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
            special = set(self.tokenizer.get_added_tokens_decoder())
            self.ids = [i for i in range(self.tokenizer.get_vocab_size()) if i not in special]

    def make(self, num_tokens: int) -> tuple[str, int]:
        """(text, its token count)."""
        if self.tokenizer is None:
            words: list[str] = []
            while sum(len(w) + 1 for w in words) < num_tokens * CHARS_PER_TOKEN:
                words.append(self.rng.choice(WORDS))
            return " ".join(words), num_tokens
        ids = [self.rng.choice(self.ids) for _ in range(num_tokens)]
        text = self.tokenizer.decode(ids)
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids[:num_tokens]
        text = self.tokenizer.decode(ids)
        return text, len(self.tokenizer.encode(text, add_special_tokens=False).ids)


def length_range(spec: str, ratio: float) -> tuple[int, int]:
    """ "N" -> [N*(1-ratio), N*(1+ratio)]; "LO:HI" -> [LO, HI]."""
    if ":" in spec:
        lo, hi = (int(x) for x in spec.split(":", 1))
    else:
        n = int(spec)
        lo, hi = math.floor(n * (1 - ratio)), math.ceil(n * (1 + ratio))
    if lo < 1 or hi < lo:
        raise ValueError(f"bad length {spec!r} (ratio {ratio}): need 1 <= low <= high")
    return lo, hi


def make_dataset(config: BenchConfig) -> list[BenchRequest]:
    """The requests of a run, fixed by `config.seed`."""
    rng = random.Random(config.seed)
    maker = PromptMaker(rng, config.tokenizer)
    out_lo, out_hi = length_range(config.random_output_len, config.random_range_ratio)
    requests = []
    if config.dataset == "random":
        in_lo, in_hi = length_range(config.random_input_len, config.random_range_ratio)
        for _ in range(config.num_prompts):
            text, count = maker.make(rng.randint(in_lo, in_hi))
            requests.append(BenchRequest(text, count, rng.randint(out_lo, out_hi)))
    elif config.dataset == "shared-prefix":
        prefixes = [maker.make(config.shared_prefix_len) for _ in range(max(config.shared_prefix_groups, 1))]
        for i in range(config.num_prompts):
            prefix, prefix_count = prefixes[i % len(prefixes)]
            suffix, suffix_count = maker.make(config.shared_suffix_len)
            output_len = rng.randint(out_lo, out_hi)
            requests.append(BenchRequest(f"{prefix} {suffix}", prefix_count + suffix_count, output_len))
        rng.shuffle(requests)
    else:
        raise ValueError(f"unknown dataset {config.dataset!r} (random | shared-prefix)")
    return requests


# ------------------------------------------------------------------------------------------------- running


def _payload(config: BenchConfig, request: BenchRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"model": config.model, "max_tokens": request.output_len, "stream": True,
                            "stream_options": {"include_usage": True}, "ignore_eos": True,
                            "temperature": config.temperature}
    if config.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        body["prompt"] = request.prompt
    return body


async def send_request(client: httpx.AsyncClient, config: BenchConfig, request: BenchRequest) -> RequestResult:
    """Send one streamed request and time its chunks."""
    path = "/v1/chat/completions" if config.endpoint == "chat" else "/v1/completions"
    result = RequestResult(prompt_tokens=request.prompt_len)
    start = last = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", path, json=_payload(config, request)) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    result.e2e_s = time.perf_counter() - start
                    continue  # read to the end, as the OpenAI SDK does, so the connection stays reusable
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"].get("message", event["error"]))
                    return result
                if event.get("usage"):
                    result.prompt_tokens = event["usage"].get("prompt_tokens", result.prompt_tokens)
                    result.output_tokens = event["usage"].get("completion_tokens", 0)
                for choice in event.get("choices") or []:
                    delta = choice.get("delta") or {}
                    text = delta.get("content") if config.endpoint == "chat" else choice.get("text")
                    if text:
                        now = time.perf_counter()
                        if chunks == 0:
                            result.ttft_s = now - start
                        else:
                            result.itl_s.append(now - last)
                        last, chunks = now, chunks + 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e_s = result.e2e_s or time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    result.ok = chunks > 0
    if not result.ok:
        result.error = "no output"
    return result


async def _progress(done: list[RequestResult], total: int, start: float) -> None:
    tty = sys.stderr.isatty()
    while True:
        await asyncio.sleep(1.0 if tty else 5.0)
        errors = sum(not r.ok for r in done)
        line = f"[bench] {len(done)}/{total} done, {errors} error(s), {time.perf_counter() - start:.1f}s"
        print(f"\r{line}" if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)


async def arun_benchmark(config: BenchConfig, requests: list[BenchRequest] | None = None) -> dict[str, Any]:
    """Run the benchmark and return the result dict (see `summarize`)."""
    requests = make_dataset(config) if requests is None else requests
    rng = random.Random(config.seed + 1)
    headers = dict(config.headers)
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    base = config.base_url.rstrip("/").removesuffix("/v1")
    limit = config.max_concurrency or len(requests) or 1
    semaphore = asyncio.Semaphore(limit)
    done: list[RequestResult] = []

    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=httpx.Timeout(config.timeout_s, connect=30),
                                 limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit)) as client:

        async def one(request: BenchRequest) -> RequestResult:
            async with semaphore:
                result = await send_request(client, config, request)
            done.append(result)
            return result

        start = time.perf_counter()
        progress = asyncio.ensure_future(_progress(done, len(requests), start)) if config.progress else None
        tasks = []
        for i, request in enumerate(requests):
            if i and math.isfinite(config.request_rate) and config.request_rate > 0:
                await asyncio.sleep(rng.expovariate(config.request_rate))  # Poisson arrivals
            tasks.append(asyncio.ensure_future(one(request)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        if progress is not None:
            progress.cancel()
            if sys.stderr.isatty():
                print(file=sys.stderr)
    return summarize(config, results, duration)


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    """mean, p50, p90, p99 (linear interpolation), scaled (seconds -> ms by default)."""
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def pct(q: float) -> float:
        pos = (len(ordered) - 1) * q
        lo, hi = math.floor(pos), math.ceil(pos)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return {"mean": sum(ordered) / len(ordered) * scale, "p50": pct(0.5) * scale, "p90": pct(0.9) * scale,
            "p99": pct(0.99) * scale}


def summarize(config: BenchConfig, results: list[RequestResult], duration: float) -> dict[str, Any]:
    """The result dict of a run."""
    ok = [r for r in results if r.ok]
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    errors = [r.error for r in results if not r.ok]
    return {
        "endpoint": config.endpoint, "model": config.model, "dataset": config.dataset,
        "num_prompts": len(results), "completed": len(ok), "errors": len(errors), "error_samples": errors[:5],
        "request_rate": config.request_rate if math.isfinite(config.request_rate) else "inf",
        "max_concurrency": config.max_concurrency, "duration_s": duration,
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": output_tokens / duration if duration else 0.0,
        "total_token_throughput": (input_tokens + output_tokens) / duration if duration else 0.0,
        "ttft_ms": percentiles([r.ttft_s for r in ok]),
        "tpot_ms": percentiles([(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]),
        "itl_ms": percentiles([x for r in ok for x in r.itl_s]),
        "e2e_ms": percentiles([r.e2e_s for r in ok]),
    }


def run_benchmark(requests: list[BenchRequest] | None = None, **options: Any) -> dict[str, Any]:
    """Synchronous entry point for scripts: `run_benchmark(base_url=..., model=..., num_prompts=...)`."""
    return asyncio.run(arun_benchmark(BenchConfig(**options), requests))


def report(result: dict[str, Any]) -> str:
    """A human-readable table of a result."""
    lines = [f"{'endpoint':<28}{result['endpoint']} ({result['dataset']})",
             f"{'requests ok / errors':<28}{result['completed']} / {result['errors']}",
             f"{'duration (s)':<28}{result['duration_s']:.2f}",
             f"{'input / output tokens':<28}{result['total_input_tokens']} / {result['total_output_tokens']}",
             f"{'request throughput (req/s)':<28}{result['request_throughput']:.2f}",
             f"{'output throughput (tok/s)':<28}{result['output_throughput']:.2f}",
             f"{'total throughput (tok/s)':<28}{result['total_token_throughput']:.2f}",
             f"{'(ms)':<10}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}"]
    for name in ("ttft", "tpot", "itl", "e2e"):
        stats = result[f"{name}_ms"]
        lines.append(f"{name.upper():<10}" + "".join(f"{stats[k]:>10.2f}" for k in ("mean", "p50", "p90", "p99")))
    lines += [f"error: {e}" for e in result["error_samples"]]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pypto-serving bench", description=__doc__.splitlines()[0])
    p.add_argument("--base-url", required=True, help="engine or gateway, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="the served model name")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (Poisson); inf: all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--dataset", choices=("random", "shared-prefix"), default="random")
    p.add_argument("--random-input-len", default="128", help="N or LO:HI tokens")
    p.add_argument("--random-output-len", default="32", help="N or LO:HI tokens")
    p.add_argument("--random-range-ratio", type=float, default=0.0, help="N means [N*(1-r), N*(1+r)]")
    p.add_argument("--shared-prefix-groups", type=int, default=4)
    p.add_argument("--shared-prefix-len", type=int, default=256)
    p.add_argument("--shared-suffix-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (default: estimate)")
    p.add_argument("--header", action="append", default=[], metavar="K=V", help="extra request header (repeat)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    p.add_argument("--json-out", default=None, help="write the result dict here")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    return p


def main(argv: list[str]) -> int:
    """CLI entry point."""
    args = parser().parse_args(argv)
    headers = {}
    for item in args.header:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"pypto-serving bench: --header expects K=V, got {item!r}", file=sys.stderr)
            return 2
        headers[key.strip()] = value.strip()
    try:
        config = BenchConfig(
            base_url=args.base_url, model=args.model, endpoint=args.endpoint, num_prompts=args.num_prompts,
            request_rate=args.request_rate, max_concurrency=args.max_concurrency, dataset=args.dataset,
            random_input_len=args.random_input_len, random_output_len=args.random_output_len,
            random_range_ratio=args.random_range_ratio, shared_prefix_groups=args.shared_prefix_groups,
            shared_prefix_len=args.shared_prefix_len, shared_suffix_len=args.shared_suffix_len, seed=args.seed,
            tokenizer=args.tokenizer, headers=headers, api_key=args.api_key, temperature=args.temperature,
            timeout_s=args.timeout, progress=not args.no_progress)
        result = asyncio.run(arun_benchmark(config, make_dataset(config)))
    except (ValueError, OSError) as exc:
        print(f"pypto-serving bench: {exc}", file=sys.stderr)
        return 2
    print(report(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"config": _jsonable(asdict(config)), **result}, indent=2))
    return 0 if result["completed"] else 1


def _jsonable(value: dict[str, Any]) -> dict[str, Any]:
    return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in value.items()}
