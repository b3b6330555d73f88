"""The engine core: requests in, one scheduling + model step at a time, token outputs out.

Single-threaded by design: the server's engine loop thread is its only caller (``is_healthy``, ``load`` and
``stats`` only read counters). The model runs in an executor (see worker.py): in this process for
tensor_parallel_size 1, in one process per rank otherwise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pypto_serving.engine import device as devices
from pypto_serving.engine.block_manager import BlockManager
from pypto_serving.engine.config import EngineConfig
from pypto_serving.engine.layers.sampler import SampleResult, SamplingBatch
from pypto_serving.engine.loader import load_hf_config
from pypto_serving.engine.model_runner import StepInput
from pypto_serving.engine.sampling_params import SamplingParamError, SamplingParams
from pypto_serving.engine.scheduler import ScheduledBatch, Scheduler
from pypto_serving.engine.sequence import Sequence
from pypto_serving.engine.worker import InProcessExecutor, MultiprocExecutor, StepFailed, StepTimeout, WorkerDied

STALE_POLL_S = 0.5  # how long one step() waits for a timed-out step's late reply before returning


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
        tp = config.tensor_parallel_size
        if tp > devices.device_count(self.device_type):
            raise ValueError(f"tensor_parallel_size: {tp} exceeds the {devices.device_count(self.device_type)} "
                             f"visible {self.device_type} devices")
        hf_config = load_hf_config(config.model)
        self.max_model_len = resolve_max_model_len(hf_config, config.max_model_len)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model, local_files_only=True)
        self.eos_token_ids = _eos_token_ids(config.model, hf_config, self.tokenizer)
        executor_cls = InProcessExecutor if tp == 1 else MultiprocExecutor
        self.executor = executor_cls(config, self.device_type, self.max_model_len)
        info = self.executor.info
        self.vocab_size, self.num_kv_blocks, self.dtype = info.vocab_size, info.num_kv_blocks, info.dtype
        self.block_manager = BlockManager(self.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len, config.long_prefill_token_threshold)
        self._requests: dict[str, Sequence] = {}
        self._step_id = 0
        self._dead: str | None = None  # why the engine cannot serve any more
        self._stale_deadline: float | None = None  # a timed-out step must come back before this
        self._closed = False
        self.expert_tokens: dict[int, list[int]] = {}  # MoE models: tokens routed to each expert, by layer
        self.counters = {"num_finished": 0, "num_aborted": 0, "num_failed": 0, "num_steps": 0,
                         "num_failed_steps": 0, "prompt_tokens_computed": 0, "generation_tokens": 0}

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
        """Drop a request and release its blocks now (no-op when unknown or already finished)."""
        seq = self._requests.pop(request_id, None)
        if seq is not None:
            self.scheduler.finish(seq, "abort")
            self.counters["num_aborted"] += 1

    def has_unfinished_requests(self) -> bool:
        """Whether any request waits or runs."""
        return bool(self._requests)

    # ------------------------------------------------------------------ stepping

    def step(self) -> list[RequestOutput]:
        """Schedule and run one step; outputs for requests that got a token, finished or failed."""
        if self._dead is not None:
            return self._fail_all(self._dead)
        if self.executor.busy and not self._drain_stale_step():
            return self._fail_all(self._dead) if self._dead else []
        batch = self.scheduler.schedule()
        if not batch:
            return []
        self._step_id += 1
        step, sample_rows = self._build_step(batch)
        try:
            self.executor.submit(step)
            result = self.executor.wait(self.config.step_timeout_s)
        except StepTimeout:
            self._stale_deadline = time.monotonic() + self.config.step_timeout_s
            return self._fail_batch(batch, f"engine step timed out after {self.config.step_timeout_s:g}s")
        except StepFailed as exc:
            return self._fail_batch(batch, f"engine step failed: {exc}")
        except WorkerDied as exc:
            self._dead = str(exc)
            return self._fail_batch(batch, self._dead) + self._fail_all(self._dead)
        self.counters["num_steps"] += 1
        for layer, counts in (result.expert_tokens or {}).items():
            total = self.expert_tokens.setdefault(layer, [0] * len(counts))
            for e, n in enumerate(counts):
                total[e] += n
        return self._process(batch, sample_rows, result)

    def _build_step(self, batch: ScheduledBatch) -> tuple[StepInput, list[int]]:
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
        step = StepInput(self._step_id, input_ids, query_lens, context_lens, tables, sample_rows, sampling)
        return step, sample_rows

    def _process(self, batch: ScheduledBatch, sample_rows: list[int], result: SampleResult) -> list[RequestOutput]:
        sampled = dict(zip(sample_rows, result.token_ids, strict=True))
        prompt_tokens = sum(n for seq, n in zip(batch.seqs, batch.num_tokens, strict=True)
                            if seq.num_computed_tokens < seq.num_prompt_tokens)
        finished = {id(seq) for seq in self.scheduler.postprocess(batch, sampled)}
        self.counters["prompt_tokens_computed"] += prompt_tokens
        self.counters["generation_tokens"] += len(sampled)
        outputs = []
        for k, row in enumerate(sample_rows):
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

    def _drain_stale_step(self) -> bool:
        """Collect a timed-out step's late reply; False while it is still out (or when it never will be)."""
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
        self._stale_deadline = None
        return True

    def _fail_batch(self, batch: ScheduledBatch, error: str) -> list[RequestOutput]:
        self.counters["num_failed_steps"] += 1
        return [self._fail(seq, error) for seq in batch.seqs if seq.request_id in self._requests]

    def _fail_all(self, error: str) -> list[RequestOutput]:
        return [self._fail(seq, error) for seq in list(self._requests.values())]

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
            pending += max(0, seq.num_prompt_tokens - seq.num_computed_tokens)
            pending += seq.params.max_tokens - seq.num_output_tokens
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "pending_tokens": pending, "kv_cache_usage": self.block_manager.usage(),
                "max_num_seqs": self.scheduler.max_num_seqs}

    def stats(self) -> dict:
        """Cumulative counters (prefix cache in tokens, preemptions, finished/aborted/failed requests, ...)."""
        return {"prefix_cache_queries": self.scheduler.prefix_cache_queries,
                "prefix_cache_hits": self.scheduler.prefix_cache_hits,
                "num_preemptions": self.scheduler.num_preemptions, **self.counters,
                "num_kv_blocks": self.num_kv_blocks, "num_free_kv_blocks": self.block_manager.num_free_blocks,
                **({"moe_expert_tokens": {k: list(v) for k, v in self.expert_tokens.items()}}
                   if self.expert_tokens else {})}

    def is_healthy(self) -> bool:
        """False once a worker died or a timed-out step never came back."""
        if self._dead is not None or self._closed or not self.executor.alive():
            return False
        return self._stale_deadline is None or time.monotonic() < self._stale_deadline

    def shutdown(self) -> None:
        """Stop the workers (stop is sent before waiting; idempotent)."""
        if not self._closed:
            self._closed = True
            self.executor.shutdown()


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
