"""What holding requests at the gateway costs a saturated engine: the slot hand-over.

When every batch slot is busy, the gateway's slot queue (gateway/slot_queue.py) holds new requests and sends one
when a slot frees; the engine admits it at its next step, so the slot stays empty for about one step per request.
With an engine-side queue the engine admits its next request the moment a slot frees. This script saturates one
engine (2 slots, short requests, closed loop at 4x the slots) through the gateway with the queue off
(`--queue-wait 0`: every request queues at the engine), on with `--engine-queue-depth 0` (the engine never queues)
and with depth 1, in alternating rounds, and reports output tokens/s of each.

    .venv/bin/python benchmarks/gateway_queue.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gateway_common import PeerRouter, gateway_command, model_name, start_engines, write_result
from pypto_serving.engine.bench import BenchRequest, run_benchmark
from tests.support.models import tiny_model_dir

SETTINGS = {"no gateway queue": ["--queue-wait", "0"], "gateway queue, engine queue depth 0": [],
            "gateway queue, engine queue depth 1": ["--engine-queue-depth", "1"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--output-len", type=int, default=16, help="tokens per request (short: the hand-over shows)")
    p.add_argument("--max-num-seqs", type=int, default=2)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="gateway-queue-"))
    (engine,) = start_engines(tiny_model_dir("qwen3"), 1, ["--max-num-seqs", str(args.max_num_seqs),
                                                          "--max-model-len", "1024"], work)
    requests = [BenchRequest(f"hand over {i} " * 8, 24, args.output_len) for i in range(args.requests)]
    rows: dict[str, list[float]] = {name: [] for name in SETTINGS}
    try:
        model = model_name(engine.url)
        run_benchmark(requests[:16], base_url=engine.url, model=model, progress=False)  # warm-up
        for round_ in range(args.rounds):
            names = list(SETTINGS)
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                router = PeerRouter(gateway_command([engine.url], *SETTINGS[name]), work / "gateway.log")
                try:
                    r = run_benchmark(requests, base_url=router.url, model=model, progress=False,
                                      max_concurrency=4 * args.max_num_seqs)
                finally:
                    router.stop()
                rows[name].append(r["output_throughput"])
                print(f"round {round_} {name:38s} {r['output_throughput']:6.1f} output tok/s, TTFT p50 "
                      f"{r['ttft_ms']['p50']:6.1f} ms, errors {r['errors']}", flush=True)
    finally:
        engine.stop()
    summary = {name: round(statistics.median(values), 1) for name, values in rows.items()}
    base = summary["no gateway queue"]
    for name, value in summary.items():
        print(f"{name:38s} {value:6.1f} output tok/s (median), {value / base:.2f}x of no gateway queue")
    write_result("gateway_queue", {"requests": args.requests, "output_len": args.output_len,
                                   "max_num_seqs": args.max_num_seqs, "concurrency": 4 * args.max_num_seqs,
                                   "output_tok_s": rows, "median_output_tok_s": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
