"""Write docs/reliability.md from the measurements of `make chaos`: docs/benchmarks/chaos.json (benchmarks/chaos.py)
and docs/benchmarks/badinput.json (tests/system/test_bad_input.py at full size). Nothing in the tables is typed
by hand. Run: `.venv/bin/python benchmarks/reliability_report.py`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "docs" / "benchmarks"
OUT = REPO_ROOT / "docs" / "reliability.md"

BOUNDS = {
    "engine-kill": "only requests in flight on that replica fail; new requests succeed within 1 s; it restarts "
                   "and rejoins",
    "pod-delete": "only requests in flight on that replica fail; new requests succeed within 1 s; the operator "
                  "recreates it",
    "operator-kill": "zero failed requests; no duplicate pods; a restarted operator leads and reconciles",
    "apiserver": "zero failed requests; the gateways keep routing on their last view; the operator reconnects",
    "scale": "zero failed requests (two-phase drain)",
    "rollout": "zero failed requests",
    "gateway-kill": "requests sent to the other gateway unaffected; the killed one restarts and serves again",
}


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def _window(w: dict[str, Any]) -> str:
    return f"{w['sent']} / {w['succeeded']} / {w['failed']} / {_ms(w['p99_s'])}"


def chaos_section(data: dict[str, Any]) -> list[str]:
    m = data["machine"]
    lines = [
        "## Faults under steady load", "",
        f"`{data['command']}`, {data['started']}, {data['duration_s']:.0f} s in all. Machine: {m['cpu']}, "
        f"{m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, Python {m['python']}; load average "
        f"{data['load_average_start'][0]} at the start and {data['load_average_end'][0]} at the end (the cores are "
        "shared with other work).", "",
        f"System under test: the local cluster (real kube-apiserver, controllers, scheduler; hack/localkube), the "
        f"operator chart (helm/pypto-serving, 2 operator pods with leader election), one PyptoServing with "
        f"{data['replicas']} engine pods (tiny Qwen3, CPU) and {data['gateways']} gateway pods requiring an API key. "
        f"Load: {data['rate_per_s']:g} streamed completions per second ({data.get('max_tokens', 64)} tokens each), "
        "fixed rate, open loop, spread over both gateway pods by pod IP, no client retries "
        "(benchmarks/loadgen.py). A request succeeds with HTTP 200 and a complete stream ending in "
        "`data: [DONE]`. Windows: *before* = requests that finished before the fault (about "
        f"{data['phase_seconds']:g} s of steady load), *during* = requests in flight at the fault or started before "
        f"the system had recovered, *after* = requests started in the next {data['phase_seconds']:g} s. "
        "Cells: requests sent / succeeded / failed / p99 latency of the "
        "successful ones.", "",
        "The operator pods the chart created carried the securityContext "
        f"`{json.dumps(data.get('operator_pod_security_context'), sort_keys=True)}` (recorded, not enforced, by the "
        "local node agent).", "",
        "| # | scenario | before | during | after | bound | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, s in enumerate(data["scenarios"], 1):
        windows = {w["name"]: w for w in s["windows"]}
        cells = [_window(windows[k]) if k in windows else "-" for k in ("before", "during", "after")]
        verdict = "**pass**" if s["passed"] else "**FAIL**"
        lines.append(f"| {i} | {s['title']} | {cells[0]} | {cells[1]} | {cells[2]} | {BOUNDS.get(s['key'], '')} "
                     f"| {verdict} |")
    lines.append("")
    for i, s in enumerate(data["scenarios"], 1):
        lines += [f"**{i}. {s['title']}** (`--scenarios {s['key']}`). Fault: {s['fault'] or '-'}."]
        if s.get("error"):
            lines.append(f"Not recovered: {s['error']}")
        lines.append("")
        for check in s["checks"]:
            lines.append(f"- {'pass' if check['passed'] else 'FAIL'}: {check['name']} ({check['detail']})")
        extra = [w for w in s["windows"] if w["name"] not in ("before", "during", "after")]
        for w in extra:
            lines.append(f"- {w['name']}: {_window(w)}" + (f", errors {w['errors']}" if w["errors"] else ""))
        during = next((w for w in s["windows"] if w["name"] == "during"), None)
        if during and during["errors"]:
            lines.append(f"- failures during the fault by kind: {during['errors']}")
        if s["timings"]:
            lines.append("- timings (s after the fault): " + ", ".join(f"{k} {v}" for k, v in s["timings"].items()))
        lines.append("")
    return lines


def bad_input_section(data: dict[str, Any] | None) -> list[str]:
    lines = ["## Bad input", ""]
    if not data:
        return [*lines, "No measurements yet: run `make chaos`.", ""]
    fuzz = data.get("fuzz", {})
    aborted = data.get("aborted_streams", {})
    lines += [
        f"Measured by `{data.get('command', 'make chaos')}` against a real engine and the real gateway in front "
        f"of it (tests/system/test_bad_input.py; `make test` runs the same tests smaller). Load average "
        f"{data.get('load_average', '-')}.", "",
        "| check | result |", "|---|---|",
    ]
    for target in ("engine", "gateway"):
        counts = fuzz.get("status_counts", {}).get(target, {})
        total = sum(counts.values())
        fives = sum(v for k, v in counts.items() if k.startswith("5"))
        lines.append(f"| schemathesis on the {target}'s OpenAPI schema ({fuzz.get('examples_per_operation')} valid + "
                     f"invalid examples per operation, each call bounded at 60 s) | {total} requests, status codes "
                     f"{dict(sorted(counts.items()))}, {fives} 5xx, no hang |")
    lines.append("| oversized bodies (9 MiB with Content-Length, 10 MiB chunked) on engine and gateway | 413 without "
                 "reading the body; a prompt far beyond the context is a 400 |")
    for target in ("engine", "gateway"):
        slow = data.get(f"slow_clients_{target}")
        if slow:
            lines.append(f"| {slow['stalled_connections']} stalled clients (half-sent requests) on the {target} | "
                         f"{slow['requests_ok']}/8 concurrent normal requests served in {slow['seconds']} s |")
    if aborted:
        lines.append(
            f"| {aborted['count']} streams aborted after their first token (half through the gateway, half direct) | "
            f"{aborted['seconds']} s; `vllm:kv_cache_usage_perc` {aborted['kv_idle']} idle -> {aborted['kv_after']} "
            f"after; {aborted['aborted_counted']:.0f} requests counted as aborted; RSS growth engine "
            f"{aborted['engine_rss_growth_mb']} MB (of {aborted['engine_rss_mb_before']} MB), gateway "
            f"{aborted['gateway_rss_growth_mb']} MB (of {aborted['gateway_rss_mb_before']} MB) |")
    lines += [
        "", "The invalid-resource corpus (tests/operator/invalid_corpus.yaml, one mistake per resource, each with the "
        "message it must get) is exercised by the operator's tests, not duplicated here: "
        "tests/operator/test_validation.py (pure validation of every case), "
        "tests/operator/test_cluster_validation.py::test_webhook_rejects_every_invalid_resource_at_apply_time "
        "(`kubectl apply` of every case through the real webhook, or the CRD schema for the structural ones) and "
        "::test_without_the_webhook_the_reconciler_flags_invalid_resources (the same resources stored without the "
        "webhook: phase Invalid, SpecValid=False with the message, an InvalidSpec event, no pods).", ""]
    return lines


SECURITY = Path(__file__).with_name("reliability_security.md")  # prose and test references, not numbers


def write_report(out: Path = OUT) -> Path:
    """Render docs/reliability.md from the JSON results."""
    chaos_file, bad_file = RESULTS / "chaos.json", RESULTS / "badinput.json"
    lines = ["# Reliability", "",
             "What happens to users' requests when parts of the system fail, what bad input does, and how the "
             "deployment is locked down. Generated by `make chaos` (benchmarks/chaos.py, "
             "tests/system/test_bad_input.py at full size, benchmarks/reliability_report.py) from "
             "[benchmarks/chaos.json](benchmarks/chaos.json) and [benchmarks/badinput.json](benchmarks/badinput.json);"
             " do not edit by hand. `make test` runs a lean version (tests/system/: one chaos scenario, fuzzing with "
             "fewer examples, 300 aborted streams, the security checks).", ""]
    if chaos_file.exists():
        lines += chaos_section(json.loads(chaos_file.read_text()))
    else:
        lines += ["## Faults under steady load", "", "No measurements yet: run `make chaos`.", ""]
    lines += bad_input_section(json.loads(bad_file.read_text()) if bad_file.exists() else None)
    lines += SECURITY.read_text().splitlines()
    out.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {out}", flush=True)
    return out


if __name__ == "__main__":
    write_report()
    sys.exit(0)
