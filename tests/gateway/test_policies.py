"""Routing policies (pure logic): scores, random tie-breaks, round-robin, bounded-load consistent hashing."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pypto_serving.gateway.policies import POLICIES, PolicyConfig, make_policy
from pypto_serving.gateway.policies.hashring import HashRing, stable_hash
from pypto_serving.gateway.policies.least_pending_tokens import start_cost
from pypto_serving.gateway.policies.prefix_aware import prefix_key
from pypto_serving.gateway.replicas import LoadReading, Replica
from pypto_serving.gateway.request import RequestInfo, request_info

NOW = 1000.0


def replica(name: str, pending: int = 0, running: int = 0, waiting: int = 0, slots: int | None = None,
            remaining: tuple[int, ...] = (), kv: float = 0.0) -> Replica:
    r = Replica(name, f"http://{name}", clock=lambda: NOW)
    r.update(LoadReading(running=running, waiting=waiting, pending_tokens=pending, max_num_seqs=slots,
                         running_remaining=remaining, kv_cache_usage=kv, requested_at=NOW, received_at=NOW))
    return r


def test_registry_knows_every_policy() -> None:
    assert set(POLICIES) == {"least-pending-tokens", "least-requests", "round-robin", "prefix-aware", "session"}
    with pytest.raises(KeyError, match="known"):
        make_policy("fastest")


def test_least_pending_tokens_includes_local_extra() -> None:
    a, b = replica("a", pending=100), replica("b", pending=80)
    policy = make_policy("least-pending-tokens")
    assert policy.select([a, b], RequestInfo(), NOW) is b
    b.dispatch(50)  # 130 now
    assert policy.select([a, b], RequestInfo(), NOW) is a


def test_least_pending_tokens_prefers_a_free_batch_slot() -> None:
    """One long request next to a free slot beats two short ones with a queue behind them: the request would wait
    there although its pending tokens are fewer. Among free slots, the smallest batch, then fewer pending tokens."""
    policy = make_policy("least-pending-tokens")
    long_one = replica("long", pending=600, running=1, slots=2, remaining=(600,))
    queued = replica("queued", pending=300, running=2, waiting=8, slots=2, remaining=(10, 20))
    assert policy.select([long_one, queued], RequestInfo(), NOW) is long_one
    long_one.dispatch(20)  # sent since the reading: it takes the free slot
    assert start_cost(long_one, 2.0, NOW)[0] == 1  # no free slot any more: it waits
    empty, busier = replica("empty", pending=900, slots=4), replica("busier", pending=10, running=2, slots=4)
    assert policy.select([busier, empty], RequestInfo(), NOW) is empty  # smallest batch first
    twin = replica("twin", pending=800, slots=4)
    assert policy.select([empty, twin], RequestInfo(), NOW) is twin  # same batch: fewer pending tokens


def test_least_pending_tokens_waits_for_the_slot_that_frees_first() -> None:
    """Both full: the replica whose next running request finishes first, not the one with fewer pending tokens."""
    policy = make_policy("least-pending-tokens")
    nearly_done = replica("nearly-done", pending=505, running=2, slots=2, remaining=(5, 500))
    medium = replica("medium", pending=200, running=2, slots=2, remaining=(100, 100))
    assert policy.select([medium, nearly_done], RequestInfo(), NOW) is nearly_done
    nearly_done.dispatch(30)  # queued behind it now: the next one waits for the long request there
    assert policy.select([medium, nearly_done], RequestInfo(), NOW) is medium
    queue = replica("queue", pending=2000, running=2, waiting=5, slots=2, remaining=(1, 2))  # past what it reported
    assert policy.select([queue, medium], RequestInfo(), NOW) is medium


def test_least_pending_tokens_kv_pressure_unknown_and_silent_engines() -> None:
    policy = make_policy("least-pending-tokens")
    kv_full = replica("kv-full", pending=10, running=1, slots=4, remaining=(300,), kv=0.99)
    full = replica("full", pending=100, running=4, slots=4, remaining=(50, 60, 70, 80))
    assert policy.select([kv_full, full], RequestInfo(), NOW) is full  # no blocks: it waits 300, not 50
    no_slots = replica("old-engine", pending=50, running=5)  # no max_num_seqs reported: tried after a free slot
    assert policy.select([no_slots, replica("slot", pending=70, running=0, slots=4)], RequestInfo(), NOW).name == "slot"
    silent = Replica("silent", "http://silent", clock=lambda: NOW)  # no reading: unknown, not idle
    assert policy.select([silent, replica("free", pending=400, running=3, slots=4)], RequestInfo(), NOW).name == "free"
    assert policy.select([silent, full], RequestInfo(), NOW) is silent  # nothing of ours there vs a 50-token wait
    for _ in range(3):
        silent.dispatch(40)
    assert policy.select([silent, full], RequestInfo(), NOW) is full


def test_load_reading_is_checked_against_the_contract() -> None:
    assert LoadReading.from_json({"max_num_seqs": 8}, NOW, NOW).max_num_seqs == 8
    assert LoadReading.from_json({"max_num_seqs": None}, NOW, NOW).max_num_seqs is None  # not loaded yet
    for odd in (0, -1, "8", True, 2.5):
        with pytest.raises(ValueError, match="max_num_seqs"):
            LoadReading.from_json({"max_num_seqs": odd}, NOW, NOW)
    for field, odd in (("running", -1), ("waiting", "3"), ("pending_tokens", 1.5), ("kv_cache_usage", 2.0),
                       ("draining", "yes")):
        with pytest.raises(ValueError, match=field):
            LoadReading.from_json({field: odd}, NOW, NOW)
    with pytest.raises(ValueError, match="JSON object"):
        LoadReading.from_json([1, 2], NOW, NOW)


def test_least_requests_counts_running_waiting_and_local() -> None:
    a, b = replica("a", pending=0, running=2, waiting=1), replica("b", pending=10**6, running=1)
    policy = make_policy("least-requests")
    assert policy.select([a, b], RequestInfo(), NOW) is b
    for _ in range(3):
        b.dispatch(1)  # 1 running + 3 dispatched > 3
    assert policy.select([a, b], RequestInfo(), NOW) is a


def test_ties_are_broken_at_random() -> None:
    replicas = [replica(n) for n in "abcd"]
    policy = make_policy("least-pending-tokens", rng=random.Random(7))
    picks = Counter(policy.select(replicas, RequestInfo(), NOW).name for _ in range(400))
    assert set(picks) == set("abcd") and min(picks.values()) > 50


def test_round_robin_cycles_in_name_order() -> None:
    replicas = [replica(n) for n in "cab"]
    policy = make_policy("round-robin")
    assert [policy.select(replicas, RequestInfo(), NOW).name for _ in range(6)] == list("abcabc")


def test_prefix_key_uses_leading_whole_blocks() -> None:
    assert prefix_key("", 4, 2) is None
    assert prefix_key("abc", 4, 2) == "abc"
    assert prefix_key("abcdefghij", 4, 2) == "abcdefgh"
    assert prefix_key("abcdef", 4, 2) == "abcd"


def test_prefix_aware_same_prefix_same_replica_distinct_prefixes_spread() -> None:
    cfg = PolicyConfig(prefix_block_chars=16, prefix_blocks=2)
    replicas = [replica(f"pod-{i}") for i in range(4)]
    policy = make_policy("prefix-aware", cfg)
    shared = "S" * 32
    picks = {policy.select(replicas, RequestInfo(prefix_text=shared + f" question {i}"), NOW).name for i in range(20)}
    assert len(picks) == 1
    spread = Counter(policy.select(replicas, RequestInfo(prefix_text=f"{i:032d}"), NOW).name for i in range(200))
    assert len(spread) == 4 and min(spread.values()) > 20


def test_prefix_aware_is_deterministic_across_gateway_instances() -> None:
    cfg = PolicyConfig(prefix_block_chars=8, prefix_blocks=1)
    one = make_policy("prefix-aware", cfg, rng=random.Random(1))
    two = make_policy("prefix-aware", cfg, rng=random.Random(2))
    r1 = [replica(f"pod-{i}") for i in range(5)]
    r2 = [replica(f"pod-{i}") for i in reversed(range(5))]
    for i in range(50):
        req = RequestInfo(prefix_text=f"prefix-{i:04d}-tail")
        assert one.select(r1, req, NOW).name == two.select(r2, req, NOW).name


def test_bounded_loads_overflow_to_the_next_replica_on_the_ring() -> None:
    cfg = PolicyConfig(balance_epsilon=0.25, balance_slack_tokens=0, prefix_block_chars=8, prefix_blocks=1)
    replicas = [replica(f"pod-{i}", pending=1000) for i in range(4)]
    policy = make_policy("prefix-aware", cfg)
    req = RequestInfo(prefix_text="shared-prefix", max_tokens=10)
    home = policy.select(replicas, req, NOW)
    home.update(LoadReading(pending_tokens=5000, requested_at=NOW, received_at=NOW))
    # mean after placement = (8000 + 10) / 4 = 2002.5; bound = 2503 < 5000: home is over the bound
    other = policy.select(replicas, req, NOW)
    assert other is not home
    ring = HashRing([r.name for r in replicas], cfg.virtual_nodes)
    order = [n for n in ring.walk(stable_hash("shared-p")) if n != home.name]
    assert other.name == order[0]  # the next replica clockwise, not a random one
    assert all(r.pending_tokens(2.0, NOW) <= 2503 for r in replicas if r is other)


def test_slack_keeps_affinity_at_light_load() -> None:
    cfg = PolicyConfig(balance_slack_tokens=4096, prefix_block_chars=8, prefix_blocks=1)
    replicas = [replica(f"pod-{i}") for i in range(4)]
    policy = make_policy("prefix-aware", cfg)
    req = RequestInfo(prefix_text="shared-prefix", prompt_tokens=200, max_tokens=100)
    home = policy.select(replicas, req, NOW)
    for _ in range(5):
        home.dispatch(req.tokens)
        assert policy.select(replicas, req, NOW) is home  # 1500 pending tokens is within the slack


def test_session_affinity_by_header_or_user_and_fallback() -> None:
    replicas = [replica(f"pod-{i}", pending=10 * i) for i in range(4)]
    policy = make_policy("session")
    by_header = request_info({"prompt": "x"}, session_header="abc")
    by_user = request_info({"prompt": "x", "user": "abc"})
    assert policy.select(replicas, by_header, NOW) is policy.select(replicas, by_user, NOW)
    assert len({policy.select(replicas, request_info({"user": f"u{i}"}), NOW).name for i in range(50)}) == 4
    assert policy.select(replicas, request_info({"prompt": "x"}), NOW).name == "pod-0"  # least pending


def test_request_info_estimates() -> None:
    info = request_info({"prompt": "a" * 40, "max_tokens": 7, "stream": True})
    assert (info.prompt_tokens, info.max_tokens, info.tokens, info.stream) == (10, 7, 17, True)
    assert request_info({"prompt": [1, 2, 3], "max_tokens": 2}).tokens == 5
    chat = request_info({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                         "max_completion_tokens": 4, "n": 2})
    assert chat.max_tokens == 8 and "hi" in chat.prefix_text
    odd = request_info({"prompt": 5, "max_tokens": "many", "n": True}, default_max_tokens=99)
    assert odd.tokens == 99 and not odd.stream


def test_a_request_that_ended_since_the_reading_frees_its_slot_at_once() -> None:
    policy = make_policy("least-pending-tokens")
    a = replica("a", pending=0, slots=2)
    ticket = a.dispatch(10, dispatch_id="d1")
    a.pushed(LoadReading(running=2, pending_tokens=40, max_num_seqs=2, running_remaining=(10, 30), requested_at=NOW,
                         received_at=NOW), ["d1"])
    b = replica("b", pending=500, running=2, slots=2, remaining=(200, 300))
    assert policy.select([a, b], RequestInfo(), NOW) is a  # a waits 10 tokens, b 200
    other = replica("c", pending=100, running=1, slots=2, remaining=(100,))
    assert policy.select([a, other], RequestInfo(), NOW) is other  # c has a free slot
    ticket.end()  # finished: its slot is free before the next update says so
    assert a.released == 1
    assert policy.select([a, other], RequestInfo(), NOW) is a  # both free now: a's batch is as small, fewer tokens
    a.pushed(LoadReading(running=1, pending_tokens=30, max_num_seqs=2, running_remaining=(30,), requested_at=NOW,
                         received_at=NOW), [])
    assert a.released == 0
