"""The engine core: requests in, one scheduling + model step at a time, token outputs out.

Single-threaded by design: the server's engine loop thread is its only caller (``is_healthy``, ``load`` and
``stats`` only read counters). The model runs in an executor (see worker.py): in this process for one rank, in
one process per rank (TP x PP) otherwise.

Micro-batches: `step` first fills the pipeline, scheduling and submitting batches from sequences not in flight
until ``micro_batches`` are out (one per pipeline stage by default; 1 is the plain blocking loop), then waits for
the oldest one only and processes its tokens. So while batch k is on the last stage, k+1 runs on the one before,
and the next `step` schedules k+N from the sequences k brought back.

DP+EP (``data_parallel_size`` > 1, see data_parallel.py): this engine is one DP rank of a group that steps in
lockstep. While the group is in a wave, `step` submits one batch per step, or a one-token dummy batch when it has
nothing to run, and waits for it; a step that fails, or a peer that is gone, breaks the group for good.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass, field

from pypto_serving.contract import MAX_RUNNING_REMAINING
from pypto_serving.engine import device as devices
from pypto_serving.engine.block_manager import BlockManager
from pypto_serving.engine.config import EngineConfig
from pypto_serving.engine.data_parallel import DPGroup
from pypto_serving.engine.layers.sampler import SampleResult, SamplingBatch
from pypto_serving.engine.loader import load_hf_config
from pypto_serving.engine.model_runner import StepInput
from pypto_serving.engine.sampling_params import SamplingParamError, SamplingParams
from pypto_serving.engine.scheduler import ScheduledBatch, Scheduler
from pypto_serving.engine.sequence import Sequence, SequenceStatus
from pypto_serving.engine.worker import InProcessExecutor, MultiprocExecutor, StepFailed, StepTimeout, WorkerDied

STALE_POLL_S = 0.5  # how long one step() waits for a timed-out step's late reply before returning
DP_POLL_S = 0.5  # DP+EP: a step's wait checks the group's health this often


@dataclass
class TokenLogprobs:
    """Logprob of a generated token and the top alternatives (raw model distribution)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None
    finished: bool
    finish_reason: str | None  # "stop" (EOS / stop_token_ids) | "length" | "abort" | "error"
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass
class MicroBatch:
    """A batch handed to the executor and not collected yet."""

    batch: ScheduledBatch
    step_id: int
    slot: int
    sample_rows: list[int]
    submitted: float = field(default_factory=time.monotonic)
    stale: bool = False  # timed out: its requests already got an error, its late result is only drained


def resolve_max_model_len(hf_config, requested: int | None) -> int:
    """``requested`` or the model's max_position_embeddings (which it may not exceed)."""
    limit = int(getattr(hf_config, "max_position_embeddings", 0) or 0)
    if requested is None:
        if not limit:
            raise ValueError("max_model_len: the model config has no max_position_embeddings; set it")
        return limit
    if limit and requested > limit:
        raise ValueError(f"max_model_len: {requested} exceeds the model's max_position_embeddings ({limit})")
    return requested


def _eos_token_ids(model_dir: str, hf_config, tokenizer) -> set[int]:
    ids: set[int] = set()
    sources: list = [getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id]
    try:
        from transformers import GenerationConfig

        sources.append(GenerationConfig.from_pretrained(model_dir, local_files_only=True).eos_token_id)
    except (OSError, ValueError):
        pass  # no generation_config.json
    for source in sources:
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(t) for t in source)
    return ids


class LLMEngine:
    """Continuous-batching engine over a paged KV cache (see scheduler.py, block_manager.py, model_runner.py)."""

    def __init__(self, config: EngineConfig) -> None:
        from transformers import AutoTokenizer

        self.config = config
        self.device_type = devices.resolve_device(config.device)
        tp, pp, world = config.tensor_parallel_size, config.pipeline_parallel_size, config.world_size
        if config.ranks_per_node > devices.device_count(self.device_type):
            raise ValueError(f"tensor_parallel_size x pipeline_parallel_size: {tp} x {pp} = {world} ranks over "
                             f"{config.nnodes} node(s) exceeds the {devices.device_count(self.device_type)} visible "
                             f"{self.device_type} devices")
        hf_config = load_hf_config(config.model)
        self.max_model_len = resolve_max_model_len(hf_config, config.max_model_len)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model, local_files_only=True)
        self.eos_token_ids = _eos_token_ids(config.model, hf_config, self.tokenizer)
        # DP+EP: DP rank 0 hosts the group's store before any model rank looks for it
        self.dp = DPGroup(config) if config.data_parallel_size > 1 else None
        executor_cls = InProcessExecutor if world == 1 else MultiprocExecutor
        try:
            self.executor = executor_cls(config, self.device_type, self.max_model_len)
        except BaseException:
            if self.dp is not None:
                self.dp.declare_down("failed to start")
            raise
        info = self.executor.info
        self.vocab_size, self.num_kv_blocks, self.dtype = info.vocab_size, info.num_kv_blocks, info.dtype
        self.block_manager = BlockManager(self.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len, config.long_prefill_token_threshold)
        self._requests: dict[str, Sequence] = {}
        self.micro_batches = config.micro_batches
        self._inflight: deque[MicroBatch] = deque()  # oldest first
        self._inflight_at_wait = 0  # micro-batches in flight when the engine last waited for one
        self._inflight_since: float | None = None  # start of the current stretch with work in flight
        self._active_s = 0.0  # time with at least one micro-batch in flight (the bubble ratio's denominator)
        self._step_id = 0
        self._dead: str | None = None  # why the engine cannot serve any more
        self._stale_deadline: float | None = None  # a timed-out step must come back before this
        self._closed = False
        self.expert_tokens: dict[int, list[int]] = {}  # MoE models: tokens routed to each expert, by layer
        self.counters = {"num_finished": 0, "num_aborted": 0, "num_failed": 0, "num_steps": 0,
                         "num_failed_steps": 0, "prompt_tokens_computed": 0, "generation_tokens": 0}
        if self.dp is not None:
            self.counters |= {"dp_dummy_steps": 0}
            self.dp_sync_s = 0.0
            self.dp.start()  # every engine of the group is up: the model ranks' world has formed

    # ------------------------------------------------------------------ requests

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request (ValueError / SamplingParamError on invalid input, RuntimeError once the engine is dead)."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        params.validate()
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if any(t >= self.vocab_size for t in params.stop_token_ids):
            raise SamplingParamError("stop_token_ids", f"must be token ids below the vocabulary size {self.vocab_size}")
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                             f"{len(prompt_token_ids)} and max_tokens is {params.max_tokens} ({total} in total)")
        if total > self.num_kv_blocks * self.config.block_size:
            raise ValueError(f"prompt + max_tokens ({total}) exceeds the KV cache capacity "
                             f"({self.num_kv_blocks * self.config.block_size} tokens)")
        if self._dead is not None or not self.executor.alive():  # a worker that died while idle is not seen yet
            raise RuntimeError(f"the engine cannot serve: {self._dead or 'a worker exited'}")
        seq = Sequence(request_id, prompt_token_ids, params, self.eos_token_ids)
        self._requests[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        """Drop a request and release its blocks now, or when its micro-batch in flight comes back (no-op when
        unknown or already finished)."""
        seq = self._requests.pop(request_id, None)
        if seq is not None:
            self.scheduler.finish(seq, "abort")
            self.counters["num_aborted"] += 1

    def has_unfinished_requests(self) -> bool:
        """Whether any request waits or runs, or a micro-batch of aborted requests is still to be collected; under
        DP+EP also whether the group is in a wave (this rank must step) or broken (its requests must fail)."""
        dp = self.dp
        if dp is not None and self._dead is None and (dp.in_wave or dp.wave_pending() or dp.broken is not None):
            return True
        return bool(self._requests) or any(not mb.stale for mb in self._inflight)

    # ------------------------------------------------------------------ stepping

    def step(self) -> list[RequestOutput]:
        """Fill the pipeline with micro-batches, then collect the oldest one; outputs for requests that got a token,
        finished or failed."""
        if self.dp is not None:
            return self._dp_step()
        if self._dead is not None:
            return self._fail_all(self._dead)
        if self._stale_deadline is not None and not self._drain_stale_steps():
            return self._fail_all(self._dead) if self._dead else []
        if not self._refill():
            return self._fail_all(self._dead or "")
        if not self._inflight:
            return []
        mb = self._inflight[0]
        self._inflight_at_wait = len(self._inflight)
        try:
            result = self.executor.wait(max(0.0, mb.submitted + self.config.step_timeout_s - time.monotonic()))
        except StepTimeout:  # the micro-batches behind the oldest one are stuck behind it
            self._stale_deadline = time.monotonic() + self.config.step_timeout_s
            error = f"engine step timed out after {self.config.step_timeout_s:g}s"
            outputs = []
            for stuck in self._inflight:
                stuck.stale = True
                outputs += self._fail_batch(stuck.batch, error)
            return outputs
        except StepFailed as exc:
            self._collected()
            outputs = self._fail_batch(mb.batch, f"engine step failed: {exc}")
            if self.micro_batches > 1:
                self._refill()
            return outputs
        except WorkerDied as exc:
            self._dead = str(exc)
            return self._fail_all(self._dead)
        self._collected()
        self.counters["num_steps"] += 1
        self._count_experts(result)
        outputs = self._process(mb, result)
        if self.micro_batches > 1:  # keep every stage busy while the caller hands the outputs on
            self._refill()
        return outputs

    def _dp_step(self) -> list[RequestOutput]:
        """One lockstep step of a DP+EP group: this rank's batch or a dummy one, then the group's verdict."""
        dp = self.dp
        assert dp is not None
        if self._dead is None and dp.broken is not None:
            self._dead = f"the data-parallel group is broken: {dp.broken}"
        if self._dead is not None:
            return self._fail_all(self._dead)
        if not dp.begin_wave(bool(self._requests)):
            return []
        batch = self.scheduler.schedule()
        self._step_id += 1
        step, sample_rows = self._build_step(batch, 0) if batch else (self._dummy_step(), [])
        step.more = bool(self._requests)
        try:
            self.executor.submit(step)
            result = self._dp_wait(step)
        except (StepTimeout, StepFailed, WorkerDied) as exc:
            self._dead = f"DP rank {dp.rank}: engine step failed: {type(exc).__name__}: {exc}"
            dp.declare_down(self._dead)
            self.scheduler.retire(batch)
            return self._fail_all(self._dead)
        self.dp_sync_s = result.dp_sync_s
        if not result.dp_busy:
            dp.end_wave()
        if not batch:
            self.counters["dp_dummy_steps"] += 1
            return []
        self.counters["num_steps"] += 1
        self._count_experts(result)
        return self._process(MicroBatch(batch, self._step_id, 0, sample_rows), result)

    def _dp_wait(self, step: StepInput) -> SampleResult:
        """The step's result; StepTimeout after step_timeout_s, WorkerDied as soon as the group breaks."""
        deadline = time.monotonic() + self.config.step_timeout_s
        while True:
            try:
                return self.executor.wait(max(0.0, min(DP_POLL_S, deadline - time.monotonic())))
            except StepTimeout:
                if self.dp is not None and self.dp.broken is not None:
                    raise WorkerDied(f"the data-parallel group is broken: {self.dp.broken}") from None
                if time.monotonic() >= deadline:
                    raise

    def _dummy_step(self) -> StepInput:
        """One token at position 0, written to the scratch block past the pool, sampling nothing: this rank's part
        of a step in which only other DP ranks have work."""
        return StepInput(self._step_id, [0], [1], [1], [[self.num_kv_blocks]], [], None, 0)

    def _count_experts(self, result: SampleResult) -> None:
        for layer, counts in (result.expert_tokens or {}).items():
            total = self.expert_tokens.setdefault(layer, [0] * len(counts))
            for e, n in enumerate(counts):
                total[e] += n

    def _refill(self) -> bool:
        """`_fill`; False when a worker turned out to be gone."""
        try:
            self._fill()
        except WorkerDied as exc:
            self._dead = str(exc)
            return False
        return True

    def _fill(self) -> None:
        """Schedule and submit micro-batches until ``micro_batches`` are in flight or nothing is left to run."""
        while len(self._inflight) < self.micro_batches:
            batch = self.scheduler.schedule(self.micro_batches)
            if not batch:
                return
            self._step_id += 1
            used = {mb.slot for mb in self._inflight}
            slot = next(s for s in range(self.micro_batches) if s not in used)
            step, sample_rows = self._build_step(batch, slot)
            mb = MicroBatch(batch, self._step_id, slot, sample_rows)
            self._inflight.append(mb)
            if self._inflight_since is None:
                self._inflight_since = mb.submitted
            self.executor.submit(step)

    def _collected(self) -> MicroBatch:
        """Take the oldest micro-batch off the pipeline; its sequences may be scheduled again."""
        mb = self._inflight.popleft()
        self.scheduler.retire(mb.batch)
        if not self._inflight and self._inflight_since is not None:
            self._active_s += time.monotonic() - self._inflight_since
            self._inflight_since = None
        return mb

    def _build_step(self, batch: ScheduledBatch, slot: int) -> tuple[StepInput, list[int]]:
        input_ids: list[int] = []
        query_lens, context_lens, tables, sample_rows = [], [], [], []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens, strict=True)):
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start:start + n])
            query_lens.append(n)
            context_lens.append(start + n)
            tables.append(seq.block_table)
            if start + n == seq.num_tokens:
                sample_rows.append(i)
        sampling = _sampling_batch([batch.seqs[i] for i in sample_rows], self.vocab_size) if sample_rows else None
        step = StepInput(self._step_id, input_ids, query_lens, context_lens, tables, sample_rows, sampling, slot)
        return step, sample_rows

    def _process(self, mb: MicroBatch, result: SampleResult) -> list[RequestOutput]:
        batch, sample_rows = mb.batch, mb.sample_rows
        live = [seq.status is SequenceStatus.RUNNING for seq in batch.seqs]  # not aborted while in flight
        sampled = {row: token for row, token in zip(sample_rows, result.token_ids, strict=True) if live[row]}
        prompt_tokens = sum(n for seq, n, ok in zip(batch.seqs, batch.num_tokens, live, strict=True)
                            if ok and seq.num_computed_tokens < seq.num_prompt_tokens)
        finished = {id(seq) for seq in self.scheduler.postprocess(batch, sampled)}
        self.counters["prompt_tokens_computed"] += prompt_tokens
        self.counters["generation_tokens"] += len(sampled)
        outputs = []
        for k, row in enumerate(sample_rows):
            if row not in sampled:
                continue
            seq, token = batch.seqs[row], sampled[row]
            logprobs = None
            if result.logprobs is not None and result.logprobs[k] is not None:
                lp, top = result.logprobs[k]
                logprobs = [TokenLogprobs(token, lp, top)]
            done = id(seq) in finished
            if done:
                del self._requests[seq.request_id]
                self.counters["num_finished"] += 1
            outputs.append(RequestOutput(seq.request_id, [token], logprobs, done, seq.finish_reason if done else None,
                                         num_prompt_tokens=seq.num_prompt_tokens,
                                         num_cached_tokens=max(seq.num_cached_tokens, 0)))
        return outputs

    def _drain_stale_steps(self) -> bool:
        """Collect timed-out micro-batches' late replies; False while one is still out (or never will be)."""
        while self._inflight:
            remaining = (self._stale_deadline or 0.0) - time.monotonic()
            try:
                self.executor.wait(max(0.0, min(remaining, STALE_POLL_S)))
            except StepTimeout:
                if time.monotonic() >= (self._stale_deadline or 0.0):
                    self._dead = "a timed-out step did not complete within another step_timeout_s"
                return False
            except StepFailed:
                pass
            except WorkerDied as exc:
                self._dead = str(exc)
                return False
            self._collected()
        self._stale_deadline = None
        return True

    def _fail_batch(self, batch: ScheduledBatch, error: str) -> list[RequestOutput]:
        self.counters["num_failed_steps"] += 1
        # `is seq`: an id aborted while in flight may already name a new request
        return [self._fail(seq, error) for seq in batch.seqs if self._requests.get(seq.request_id) is seq]

    def _fail_all(self, error: str) -> list[RequestOutput]:
        """Fail every request; the engine is dead, so the micro-batches in flight never come back."""
        outputs = [self._fail(seq, error) for seq in list(self._requests.values())]
        while self._inflight:
            self._collected()
        return outputs

    def _fail(self, seq: Sequence, error: str) -> RequestOutput:
        self.scheduler.finish(seq, "error")
        del self._requests[seq.request_id]
        self.counters["num_failed"] += 1
        return RequestOutput(seq.request_id, [], None, True, "error", error=error,
                             num_prompt_tokens=seq.num_prompt_tokens,
                             num_cached_tokens=max(seq.num_cached_tokens, 0))

    # ------------------------------------------------------------------ introspection and lifecycle

    def load(self) -> dict:
        """Router load: running and waiting requests, pending tokens, KV usage (see CONTRACT.md), and the batch
        slots (``max_num_seqs``: a router can tell a replica with a free slot from one whose next request waits)."""
        pending = 0
        for seq in self._requests.values():
            pending += left_of(seq)
        remaining = heapq.nsmallest(MAX_RUNNING_REMAINING, (left_of(seq) for seq in self.scheduler.running))
        load = {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "pending_tokens": pending, "kv_cache_usage": self.block_manager.usage(),
                "max_num_seqs": self.scheduler.max_num_seqs, "running_remaining": remaining}
        if self.dp is not None:
            load |= {"dp_rank": self.dp.rank, "dp_size": self.dp.size}
        return load

    def stats(self) -> dict:
        """Cumulative counters (prefix cache in tokens, preemptions, finished/aborted/failed requests, ...)."""
        return {"prefix_cache_queries": self.scheduler.prefix_cache_queries,
                "prefix_cache_hits": self.scheduler.prefix_cache_hits,
                "num_preemptions": self.scheduler.num_preemptions, **self.counters,
                "num_kv_blocks": self.num_kv_blocks, "num_free_kv_blocks": self.block_manager.num_free_blocks,
                "pp_inflight_micro_batches": self._inflight_at_wait if self.has_unfinished_requests() else 0,
                "pp_stage_idle_ratio": self.stage_idle_ratios(),
                **({"moe_expert_tokens": {k: list(v) for k, v in self.expert_tokens.items()}}
                   if self.expert_tokens else {}),
                **({"dp_sync_seconds": self.dp_sync_s} if self.dp is not None else {})}

    def stage_idle_ratios(self) -> list[float]:
        """Per pipeline stage, the fraction of the time with work in flight that the stage did not compute (the
        pipeline bubble, plus scheduling and transfer time), since start."""
        active = self._active_s
        if self._inflight_since is not None:
            active += time.monotonic() - self._inflight_since
        if active <= 0:
            return [0.0] * self.config.pipeline_parallel_size
        return [min(1.0, max(0.0, 1.0 - busy / active)) for busy in self.executor.stage_busy_s]

    def is_healthy(self) -> bool:
        """False once a worker died or a timed-out step never came back."""
        if self._dead is not None or self._closed or not self.executor.alive():
            return False
        if self.dp is not None and self.dp.broken is not None:
            return False
        return self._stale_deadline is None or time.monotonic() < self._stale_deadline

    def shutdown(self) -> None:
        """Stop the workers (stop is sent before waiting; idempotent)."""
        if not self._closed:
            self._closed = True
            if self.dp is not None:
                self.dp.declare_down("shut down")
                self.dp.close()
            self.executor.shutdown()


def left_of(seq: Sequence) -> int:
    """Tokens a request has left at most: prompt tokens not computed yet + tokens up to its max_tokens."""
    return max(0, seq.num_prompt_tokens - seq.num_computed_tokens) + seq.params.max_tokens - seq.num_output_tokens


def _sampling_batch(seqs: list[Sequence], vocab_size: int) -> SamplingBatch:
    """Sampling settings of the sequences that sample this step, in order."""
    params = [s.params for s in seqs]
    banned = [sorted(t for t in s.stop_ids if t < vocab_size) if s.num_output_tokens < s.params.min_tokens else []
              for s in seqs]
    batch = SamplingBatch(
        temperatures=[p.temperature for p in params], top_ps=[p.top_p for p in params],
        top_ks=[p.top_k for p in params], min_ps=[p.min_p for p in params], seeds=[p.seed for p in params],
        output_positions=[s.num_output_tokens for s in seqs],
        logprobs=[-1 if p.logprobs is None else p.logprobs for p in params],
        banned=banned if any(banned) else None)
    if any(p.has_penalties for p in params):
        batch.penalties = [(p.presence_penalty, p.frequency_penalty, p.repetition_penalty) for p in params]
        batch.output_tokens = [s.output_token_ids if s.params.has_penalties else [] for s in seqs]
        batch.prompt_tokens = [s.token_ids[:s.num_prompt_tokens] if s.params.repetition_penalty != 1.0 else []
                               for s in seqs]
    return batch
