"""Where the model runs: executors that hand steps to the ranks and wait for their results with a deadline.

- one rank (`InProcessExecutor`): the runner lives in the engine process; a dedicated thread runs each step, so a
  hung step can time out without IPC or serialization.
- TP x PP > 1 (`MultiprocExecutor`): one spawned process per rank (rank ``stage * TP + tp_rank`` binds that device
  of the pod's group and joins a gloo / NCCL / HCCL process group); every step is pickled once and sent to all
  ranks over pipes; every rank replies, rank 0 of the last stage with the sampled tokens. A rank process exiting
  is noticed at once through its sentinel.

Several steps (micro-batches) may be in flight: `submit` never waits, `wait` returns the oldest one's result
(ranks run steps in submission order). Both raise `StepTimeout` (the oldest step is still in flight: it stays
pending until its late reply is drained), `StepFailed` (the step raised on a rank; the ranks go on with the next
one) or `WorkerDied`.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import pickle
import queue
import signal
import socket
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

import torch
import torch.distributed as dist

from pypto_serving.engine import device as devices
from pypto_serving.engine.config import EngineConfig
from pypto_serving.engine.layers.sampler import SampleResult
from pypto_serving.engine.model_runner import ModelInfo, ModelRunner, StepInput
from pypto_serving.engine.pipeline import rank_of_stage, stage_of_rank
from pypto_serving.startup import freeze_startup_objects, release_free_memory

WORKER_START_TIMEOUT_S = 3600.0  # loading a large checkpoint on every rank can take a while
WORKER_STOP_TIMEOUT_S = 10.0
LEADER_PING_S = 10.0  # an idle leader pings the ranks on other nodes this often (gloo collectives time out)
IDLE_TRIM_S = 1.0  # a rank that got no step for this long after running some trims its C heap


class StepTimeout(Exception):
    """The step did not finish in time; it may still complete later."""


class StepFailed(Exception):
    """The step raised on the workers; they are idle again."""


class WorkerDied(Exception):
    """A worker (process or thread) is gone; the engine cannot serve any more."""


class InProcessExecutor:
    """One rank: one `ModelRunner` in this process, built and driven by a dedicated thread.

    The thread that runs the steps also loads the model: on cpu, oneDNN and OpenMP work started from two
    different threads (weights reordered on one, steps run on another) made every decode step ~5 ms slower
    (measured on the ~50M model at 2 threads: 21 vs 16 ms per batch-1 step)."""

    def __init__(self, config: EngineConfig, device_type: str, max_model_len: int) -> None:
        self._inbox: queue.SimpleQueue[StepInput | None] = queue.SimpleQueue()
        self._outbox: queue.SimpleQueue[tuple[str, int, object]] = queue.SimpleQueue()
        self._pending: deque[int] = deque()
        built: queue.SimpleQueue[ModelRunner | BaseException] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, args=(config, device_type, max_model_len, built),
                                        name="pypto-model-runner", daemon=True)
        self._thread.start()
        runner = built.get()
        if isinstance(runner, BaseException):
            self._thread.join(timeout=WORKER_STOP_TIMEOUT_S)
            raise runner
        self.runner = runner
        self.info: ModelInfo = runner.info()

    def _loop(self, config: EngineConfig, device_type: str, max_model_len: int,
              built: queue.SimpleQueue[ModelRunner | BaseException]) -> None:
        try:
            if device_type == "cpu":
                torch.set_num_threads(devices.cpu_threads_per_rank(1, config.cpu_threads))
            runner = ModelRunner(config, device_type, max_model_len)
        except BaseException as exc:  # raised again in the constructor's thread
            built.put(exc)
            return
        built.put(runner)
        while (step := self._inbox.get()) is not None:
            try:
                self._outbox.put(("ok", step.step_id, runner.execute(step)))
            except Exception as exc:  # reported to the engine; the thread keeps serving
                self._outbox.put(("error", step.step_id, f"{type(exc).__name__}: {exc}"))

    @property
    def busy(self) -> bool:
        """A submitted step has not been collected yet."""
        return bool(self._pending)

    @property
    def stage_busy_s(self) -> list[float]:
        """Seconds each pipeline stage spent computing (one stage here)."""
        return [self.runner.busy_s]

    def submit(self, step: StepInput) -> None:
        """Queue ``step`` behind the ones in flight (returns at once)."""
        self._pending.append(step.step_id)
        self._inbox.put(step)

    def wait(self, timeout: float) -> SampleResult:
        """Result of the oldest pending step, waiting at most ``timeout`` seconds."""
        if not self._thread.is_alive():
            raise WorkerDied("the model runner thread exited")
        try:
            kind, _, payload = self._outbox.get(timeout=max(0.0, timeout))
        except queue.Empty:
            raise StepTimeout from None
        self._pending.popleft()
        if kind == "error":
            raise StepFailed(str(payload))
        return payload  # type: ignore[return-value]

    def alive(self) -> bool:
        """Whether the runner thread is up."""
        return self._thread.is_alive()

    def shutdown(self) -> None:
        """Stop the runner thread (a step still running is abandoned; the thread is a daemon)."""
        self._inbox.put(None)
        self._thread.join(timeout=WORKER_STOP_TIMEOUT_S)


@dataclass
class _Replies:
    """What the ranks answered so far for one step."""

    waiting: set[int]
    result: SampleResult | None = None
    errors: list[str] = field(default_factory=list)


class MultiprocExecutor:
    """TP x PP > 1: ranks 0..N-1 as spawned processes, one device each; steps broadcast over pipes."""

    def __init__(self, config: EngineConfig, device_type: str, max_model_len: int) -> None:
        world, tp = config.world_size, config.tensor_parallel_size
        ctx = mp.get_context("spawn")
        init_method = config.dist_init_method() or f"tcp://127.0.0.1:{_free_port()}"
        self.procs: list[mp.process.BaseProcess] = []
        self.conns: list[Connection] = []
        self._pending: deque[int] = deque()  # step ids in flight, oldest first
        self._replies: dict[int, _Replies] = {}
        pp = config.pipeline_parallel_size
        self._result_rank = rank_of_stage(pp - 1, 0, tp, pp, config.leader_last)  # TP rank 0 of the last stage samples
        self._stage_of = [stage_of_rank(r, tp, pp, config.leader_last) for r in range(world)]
        self._tp = tp
        self.stage_busy_s = [0.0] * (world // tp)  # seconds each stage spent computing (its TP rank 0 reports)
        for rank in range(config.ranks_per_node):  # node 0's ranks; other nodes run theirs (node_worker.py)
            parent, child = ctx.Pipe()
            name = f"pypto-pp{self._stage_of[rank]}-tp{rank % tp}" if world > tp else f"pypto-tp-rank{rank}"
            proc = ctx.Process(target=worker_main, name=name, daemon=True,
                               args=(config, device_type, max_model_len, rank, world, init_method, child))
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        try:
            self.info: ModelInfo = self._handshake()
        except BaseException:
            self.shutdown()
            raise

    def _handshake(self) -> ModelInfo:
        infos: dict[int, ModelInfo] = {}
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while len(infos) < len(self.procs):
            ready = wait([c for r, c in enumerate(self.conns) if r not in infos] + self._sentinels(),
                         timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise RuntimeError("tensor-parallel workers did not start in time")
            for obj in ready:
                if obj not in self.conns:
                    raise RuntimeError(f"tensor-parallel worker exited while starting: {self._dead_ranks()}")
                kind, rank, payload = obj.recv()
                if kind != "ready":
                    raise RuntimeError(f"tensor-parallel rank {rank} failed to start:\n{payload}")
                infos[rank] = payload
        return infos[0]

    def _sentinels(self) -> list[int]:
        return [p.sentinel for p in self.procs]

    def _dead_ranks(self) -> str:
        return ", ".join(f"rank {r} (exit code {p.exitcode})" for r, p in enumerate(self.procs) if not p.is_alive())

    @property
    def busy(self) -> bool:
        """A submitted step has not been collected from every rank yet."""
        return bool(self._pending)

    def submit(self, step: StepInput) -> None:
        """Send ``step`` to every rank (returns at once; the ranks queue it behind the steps in flight)."""
        payload = pickle.dumps(("step", step), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for conn in self.conns:
                conn.send_bytes(payload)
        except OSError as exc:
            raise WorkerDied(f"worker unreachable: {exc}; {self._dead_ranks()}") from exc
        self._pending.append(step.step_id)
        self._replies[step.step_id] = _Replies(set(range(len(self.conns))))

    def wait(self, timeout: float) -> SampleResult:
        """Collect the oldest pending step from all ranks, waiting at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        oldest = self._replies[self._pending[0]]
        while oldest.waiting:
            conns = [self.conns[r] for r in sorted(oldest.waiting)]
            ready = wait(conns + self._sentinels(), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise StepTimeout
            for obj in ready:
                if obj not in self.conns:  # a sentinel: that rank exited (it may not be reaped yet)
                    rank = self._sentinels().index(obj)
                    dead = self.procs[rank]
                    dead.join(timeout=1.0)
                    raise WorkerDied(f"worker died: {self.procs[rank].name} (rank {rank}, exit code {dead.exitcode})")
                rank = self.conns.index(obj)
                try:
                    kind, step_id, payload, busy_s = obj.recv()
                except (EOFError, OSError) as exc:
                    raise WorkerDied(f"lost rank {rank}: {exc}") from exc
                replies = self._replies.get(step_id)
                if replies is None:
                    continue
                replies.waiting.discard(rank)
                if rank % self._tp == 0:
                    self.stage_busy_s[self._stage_of[rank]] = busy_s
                if kind == "error":
                    replies.errors.append(str(payload))
                elif rank == self._result_rank:
                    replies.result = payload
        del self._replies[self._pending.popleft()]
        if oldest.errors:
            raise StepFailed("; ".join(oldest.errors))
        return oldest.result  # type: ignore[return-value]

    def alive(self) -> bool:
        """Whether every rank process is running."""
        return all(p.is_alive() for p in self.procs)

    def shutdown(self) -> None:
        """Tell every rank to stop first, then wait for them; ranks still stuck are terminated."""
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send_bytes(pickle.dumps(("stop", None)))
        deadline = time.monotonic() + WORKER_STOP_TIMEOUT_S
        for proc in self.procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=2.0)
        for conn in self.conns:
            conn.close()


def worker_main(config: EngineConfig, device_type: str, max_model_len: int, rank: int, world: int,
                init_method: str, conn: Connection) -> None:
    """Entry point of a rank process: load the shard, then run steps until told to stop or the engine is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine process decides when ranks stop
    if config.node_rank > 0:
        _die_with_parent()  # a headless node's rank never outlives its node process (which reports its state)
    if device_type == "cpu":
        torch.set_num_threads(devices.cpu_threads_per_rank(world, config.cpu_threads))
    try:
        runner = ModelRunner(config, device_type, max_model_len, rank, world, init_method)
    except BaseException:
        conn.send(("init_error", rank, traceback.format_exc()))
        return
    freeze_startup_objects()  # a collection stall in one rank would stall every step of the group
    leader = _leader_group(config, world)
    conn.send(("ready", rank, runner.info()))
    if config.node_rank > 0:
        _follow_leader(runner, leader, rank)
        return
    pings = leader is not None and rank == 0
    ran = False  # a step ran since the C heap was last trimmed
    while True:
        try:
            wait_s = IDLE_TRIM_S if ran else LEADER_PING_S if pings else None
            if wait_s is not None and not conn.poll(wait_s):
                if ran:  # idle: what the busy period freed leaves RSS, as in the engine process
                    release_free_memory()
                    ran = False
                else:
                    _to_other_nodes(leader, ("ping", None))  # the other nodes' ranks would time out, idle
                continue
            kind, step = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            break  # the engine process is gone
        if leader is not None and rank == 0:
            _to_other_nodes(leader, (kind, step))
        if kind == "stop":
            break
        ran = True
        try:
            result = runner.execute(step)
        except Exception as exc:
            conn.send(("error", step.step_id, f"rank {rank}: {type(exc).__name__}: {exc}", runner.busy_s))
        else:
            conn.send(("ok", step.step_id, result, runner.busy_s))
    runner.shutdown()


def _leader_group(config: EngineConfig, world: int) -> dist.ProcessGroup | None:
    """A replica spanning nodes: the gloo group of rank 0 and every rank on another node, over which rank 0
    forwards each step (node 0's ranks get theirs over pipes). Every rank of the world creates it."""
    if config.nnodes == 1:
        return None
    return dist.new_group([0, *range(config.ranks_per_node, world)], backend="gloo")


def _to_other_nodes(group: dist.ProcessGroup, message: tuple[str, object]) -> None:
    dist.broadcast_object_list([message], src=0, group=group, device=torch.device("cpu"))


def _follow_leader(runner: ModelRunner, group: dist.ProcessGroup | None, rank: int) -> None:
    """A rank on another node than the leader: run every step rank 0 forwards until told to stop. A step that
    raises is reported in the log (the leader's ranks see the failed collective); a lost leader ends the process."""
    assert group is not None
    ran = False
    while True:
        box: list[object] = [None]
        dist.broadcast_object_list(box, src=0, group=group, device=torch.device("cpu"))
        kind, step = box[0]  # type: ignore[misc]
        if kind == "stop":
            break
        if kind == "ping" and ran:  # the leader has been idle for a while
            release_free_memory()
            ran = False
        if kind == "step":
            ran = True
            try:
                runner.execute(step)
            except Exception:
                traceback.print_exc()
                print(f"rank {rank}: step failed", flush=True)
    runner.shutdown()


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent exits (elsewhere: nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
