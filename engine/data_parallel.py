"""DP+EP lockstep: the engines of one data-parallel group step together, because their MoE layers share experts.

vllm-ascend's DP design. Each DP rank is its own engine (scheduler, KV cache, prefix cache, OpenAI server, ``/load``);
the D x TP model ranks of the D engines form one torch.distributed world, and every MoE layer shards its experts over
all of them (expert_parallel.py). A MoE layer is a collective over that world, so every rank must run a forward pass in
every step:

- **Waves.** The group is idle (no rank runs anything) or in a wave. An engine that gets a request while idle starts
  wave ``n`` by setting key ``wave/n`` in the group's store: a torch ``TCPStore`` that DP rank 0's engine hosts at
  ``--data-parallel-address:--data-parallel-rpc-port`` (the model ranks rendezvous through it too). Every engine's
  watcher thread blocks on that key, so the others wake within milliseconds and join; an idle group costs one
  heartbeat per second and no spinning.
- **Steps.** In a wave every engine submits one step per step: its scheduled batch, or a one-token dummy batch
  (written to a scratch KV block outside the pool) when it has nothing to run.
- **Step metadata** travels in ONE packed all-reduce (MAX) per step on the device's process group
  (`exchange_step_meta`): each DP rank's token count (how the MoE exchange slices and pads the tokens) and whether
  any rank still has unfinished requests. When none has, every engine ends the wave after the same step, as all saw
  the same numbers. (Nothing on the CPU path needs "some rank has a prefill"; a graph-mode device backend that does
  would add it to the same tensor.)
- **Failure.** Each engine bumps its heartbeat counter in the store every ``HEARTBEAT_S``. A counter that stops for
  ``DEAD_AFTER_S``, a peer that declares itself down, a failed step (a collective whose peer is gone) or a store that
  is gone marks the group broken: every engine reports unhealthy and fails its requests, none waits forever. A group is
  restarted whole (the operator's job): a DP rank 0 started again hosts a fresh store, so ranks started again with the
  same flags rejoin it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pypto_serving.engine import device as devices
from pypto_serving.engine.config import EngineConfig

log = logging.getLogger("pypto_serving.engine.data_parallel")

HEARTBEAT_S = 1.0  # each engine bumps its heartbeat this often (and its watcher re-checks the peers)
DEAD_AFTER_S = 10.0  # a peer whose heartbeat stopped this long is gone
JOIN_TIMEOUT_S = 600.0  # DP ranks wait this long for DP rank 0's store (it may still be pulling its image)
DOWN_KEY = "down"


class GroupBroken(Exception):
    """The DP group cannot step any more (a peer is gone or failed)."""


@dataclass(frozen=True)
class StepMeta:
    """What every rank of the group knows about one step after the metadata all-reduce."""

    tokens: list[int]  # tokens in each DP rank's batch (a dummy batch counts one)
    busy: bool  # some DP rank still had unfinished requests when it submitted this step


def exchange_step_meta(num_tokens: int, more: bool, dp_rank: int, dp_size: int, device: torch.device,
                       group: dist.ProcessGroup | None = None) -> StepMeta:
    """One all-reduce (MAX) of ``[tokens of DP rank 0 .. D-1, any rank has more work]`` over ``group`` (the world:
    the TP ranks of one DP rank report the same values)."""
    packed = torch.zeros(dp_size + 1, dtype=torch.int64, device=device)
    packed[dp_rank] = num_tokens
    packed[dp_size] = int(more)
    values = devices.all_reduce(packed, group, op="max").tolist()
    return StepMeta(values[:dp_size], bool(values[dp_size]))


def connect_store(config: EngineConfig, *, master: bool = False,
                  timeout_s: float = JOIN_TIMEOUT_S) -> dist.TCPStore:
    """The group's store: hosted by DP rank 0's engine (``master``), reached by everyone else as a client."""
    return dist.TCPStore(config.data_parallel_address, config.data_parallel_rpc_port, is_master=master,
                         wait_for_workers=False, timeout=timedelta(seconds=timeout_s))


def init_world(config: EngineConfig, backend: str, local_rank: int, timeout: timedelta) -> None:
    """Join the group's torch.distributed world (DP x TP ranks) as global rank ``DP rank x TP + local_rank``."""
    store = dist.PrefixStore("world", connect_store(config))
    dist.init_process_group(backend, store=store, rank=config.dist_rank_offset + local_rank,
                            world_size=config.dist_world_size, timeout=timeout)


class DPGroup:
    """This engine's place in its DP group: the wave it is in, the peers' liveness, the store it talks through.

    The engine thread calls `begin_wave` / `end_wave` / `declare_down`; a watcher thread waits for waves the peers
    start and checks heartbeats, calling ``waker`` (the engine loop's wake-up) when there is something to see.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.rank, self.size = config.data_parallel_rank, config.data_parallel_size
        # DP rank 0 hosts the store for as long as its engine lives (its model ranks rendezvous through it too)
        self._host = connect_store(config, master=True) if self.rank == 0 else None
        self._store = connect_store(config)  # the engine thread's connection
        self._watch_store = connect_store(config)  # the watcher's: a blocked wait holds its connection
        self._store.add(_heartbeat_key(self.rank), 1)
        self.wave = 0  # the wave this engine is in, or the next one while idle
        self.in_wave = False
        self._seen = -1  # the latest wave the watcher saw started
        self.broken: str | None = None
        self.waker: Callable[[], None] = lambda: None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start watching (once every engine joined the world, so every heartbeat key exists)."""
        self._thread = threading.Thread(target=self._watch, name="dp-group-watcher", daemon=True)
        self._thread.start()

    def wave_pending(self) -> bool:
        """A peer started the wave this idle engine is due to join."""
        return not self.in_wave and self._seen == self.wave

    def begin_wave(self, has_work: bool) -> bool:
        """Be in a wave for the next step: the current one, one a peer started, or a new one when this engine has
        work. False when the group is idle and this engine has nothing to do."""
        if self.in_wave:
            return True
        if self._seen != self.wave:  # no peer started this wave (as far as the watcher saw)
            if not has_work:
                return False
            self._store.set(_wave_key(self.wave), str(self.rank))
        self.in_wave = True
        return True

    def end_wave(self) -> None:
        """No rank had work in the last step: the group goes idle (every engine decides this at the same step)."""
        self.in_wave = False
        self.wave += 1

    def declare_down(self, reason: str) -> None:
        """Tell the peers this engine cannot step any more (best effort: the store may be gone too)."""
        with contextlib.suppress(Exception):
            self._store.set(DOWN_KEY, f"DP rank {self.rank}: {reason}")

    def close(self) -> None:
        """Stop the watcher."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * HEARTBEAT_S + 1)

    # ------------------------------------------------------------------ the watcher thread

    def _watch(self) -> None:
        beats: dict[int, tuple[int, float]] = {}  # peer -> (last counter value, when it last changed)
        next_beat = 0.0
        while not self._stop.is_set() and self.broken is None:
            try:
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + HEARTBEAT_S
                    self._heartbeat(beats)
                wave = self.wave
                if self.in_wave or self._seen == wave:
                    self._stop.wait(min(HEARTBEAT_S, max(0.0, next_beat - time.monotonic())))
                    continue
                try:
                    self._watch_store.wait([_wave_key(wave)], timedelta(seconds=HEARTBEAT_S))
                except dist.DistStoreError:  # timed out: nobody started it yet
                    continue
                self._seen = wave
                self.waker()
            except GroupBroken as exc:
                self._break(str(exc))
            except dist.DistError as exc:
                self._break(f"the DP group's store at DP rank 0 is unreachable: {exc}".splitlines()[0])

    def _heartbeat(self, beats: dict[int, tuple[int, float]]) -> None:
        store, now = self._watch_store, time.monotonic()
        store.add(_heartbeat_key(self.rank), 1)
        if store.check([DOWN_KEY]):
            raise GroupBroken(store.get(DOWN_KEY).decode(errors="replace"))
        peers = [r for r in range(self.size) if r != self.rank]
        for peer, value in zip(peers, store.multi_get([_heartbeat_key(r) for r in peers]), strict=True):
            count = int(value)
            last = beats.get(peer)
            if last is None or last[0] != count:
                beats[peer] = (count, now)
            elif now - last[1] > DEAD_AFTER_S:
                raise GroupBroken(f"DP rank {peer} stopped its heartbeat {now - last[1]:.0f}s ago")

    def _break(self, reason: str) -> None:
        log.error("the DP group is broken: %s", reason)
        self.broken = reason
        self.waker()


def _wave_key(wave: int) -> str:
    return f"wave/{wave}"


def _heartbeat_key(rank: int) -> str:
    return f"heartbeat/{rank}"
