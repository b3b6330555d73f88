"""Token sampling for one step: penalties, min_tokens bans, greedy / temperature, min-p, top-k, top-p, seeds.

Processing order (as vLLM): repetition, frequency and presence penalties -> banned tokens -> temperature ->
min-p -> top-k -> top-p -> sample. Sampling draws ``argmax(p / q)`` with ``q ~ Exp(1)`` (an exact draw from p);
rows with a request seed take q from a generator seeded by (seed, output position), so the same seed gives the
same tokens whatever else is in the batch. Logprobs are those of the raw model distribution (before penalties
and temperature), like vLLM's default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingBatch:
    """Per-row sampling settings of the sequences that sample this step (rows follow ``StepInput.sample_rows``)."""

    temperatures: list[float]
    top_ps: list[float]
    top_ks: list[int]  # <= 0: disabled
    min_ps: list[float]
    seeds: list[int | None]
    output_positions: list[int]  # index of the token being sampled among the request's outputs (seeds it)
    logprobs: list[int]  # -1: none; k >= 0: sampled logprob plus the top k
    banned: list[list[int]] | None = None  # tokens that may not be sampled (EOS/stop ids below min_tokens)
    # penalties, only when some row has one: (presence, frequency, repetition), output and prompt token ids
    penalties: list[tuple[float, float, float]] | None = None
    output_tokens: list[list[int]] | None = None
    prompt_tokens: list[list[int]] | None = None


@dataclass
class SampleResult:
    """Sampled token ids, and per row (None unless requested): (logprob, [(top id, top logprob), ...])."""

    token_ids: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None
    expert_tokens: dict[int, list[int]] | None = None  # MoE models: tokens per expert this step, by layer index
    dp_busy: bool = False  # DP+EP: some DP rank still had unfinished requests (the wave goes on)
    dp_sync_s: float = 0.0  # DP+EP: the rank's total time in the step-metadata all-reduce so far


def seed_for(seed: int, position: int) -> int:
    """Generator seed for a request seed and output position (a fixed 63-bit mix)."""
    return (seed * 6364136223846793005 + position * 1442695040888963407 + 1) % (1 << 63)


class Sampler:
    """Turns the logits of the sampling rows into tokens (runs on rank 0 only)."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SampleResult:
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(k >= 0 for k in batch.logprobs) else None
        if batch.penalties is not None:
            logits = self._apply_penalties(logits, batch)
        if batch.banned is not None:
            r = [i for i, ids in enumerate(batch.banned) for _ in ids]
            c = [t for ids in batch.banned for t in ids]
            logits[r, c] = float("-inf")
        greedy = [t < 1e-5 for t in batch.temperatures]
        tokens = logits.argmax(dim=-1) if all(greedy) else self._sample(logits, batch, greedy)
        token_ids = tokens.tolist()
        logprobs = None if raw_logprobs is None else self._logprobs(raw_logprobs, token_ids, batch.logprobs)
        return SampleResult(token_ids, logprobs)

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch, greedy: list[bool]) -> torch.Tensor:
        temps = torch.tensor([1.0 if g else t for g, t in zip(greedy, batch.temperatures, strict=True)],
                             device=logits.device)
        probs = torch.softmax(logits / temps[:, None], dim=-1)
        if any(p > 0 for p in batch.min_ps):
            min_p = torch.tensor(batch.min_ps, device=logits.device)
            probs = probs.masked_fill(probs < probs.amax(dim=-1, keepdim=True) * min_p[:, None], 0.0)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        if any(k > 0 for k in batch.top_ks) or any(p < 1.0 for p in batch.top_ps):
            probs = _top_k_top_p(probs, batch.top_ks, batch.top_ps)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, seed in enumerate(batch.seeds):
            if seed is not None and not greedy[i]:
                gen = torch.Generator(device=logits.device).manual_seed(seed_for(seed, batch.output_positions[i]))
                noise[i].exponential_(generator=gen)
        sampled = (probs / noise).argmax(dim=-1)
        if any(greedy):
            mask = torch.tensor(greedy, device=logits.device)
            sampled = torch.where(mask, logits.argmax(dim=-1), sampled)
        return sampled

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        vocab = logits.shape[1]
        for i, (presence, frequency, repetition) in enumerate(batch.penalties or []):
            if not (presence or frequency or repetition != 1.0):
                continue
            out = torch.tensor(batch.output_tokens[i], dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=vocab)[:vocab].to(logits.dtype)
            row = logits[i]
            if repetition != 1.0:
                seen = counts > 0
                prompt = torch.tensor(batch.prompt_tokens[i], dtype=torch.long, device=logits.device)
                seen[prompt[prompt < vocab]] = True
                row = torch.where(seen, torch.where(row > 0, row / repetition, row * repetition), row)
            row = row - frequency * counts - presence * (counts > 0).to(logits.dtype)
            logits[i] = row
        return logits

    @staticmethod
    def _logprobs(raw: torch.Tensor, token_ids: list[int], ks: list[int]) -> list:
        kmax = max(ks)
        chosen = raw.gather(1, torch.tensor(token_ids, device=raw.device)[:, None])[:, 0].tolist()
        top_v, top_i = raw.topk(kmax, dim=-1) if kmax > 0 else (None, None)
        top_v = top_v.tolist() if top_v is not None else None
        top_i = top_i.tolist() if top_i is not None else None
        out: list = []
        for i, k in enumerate(ks):
            if k < 0:
                out.append(None)
            else:
                top = list(zip(top_i[i][:k], top_v[i][:k], strict=True)) if k > 0 else []
                out.append((chosen[i], top))
        return out


def _top_k_top_p(probs: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    """Zero every token outside each row's top-k and its smallest top-p nucleus."""
    vocab = probs.shape[1]
    sorted_p, order = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=probs.device)[None, :]
    k = torch.tensor([k if k > 0 else vocab for k in top_ks], device=probs.device)
    sorted_p = sorted_p.masked_fill(ranks >= k[:, None], 0.0)
    # top-p over what top-k kept; p >= 1 never drops (rounding in the cumsum must not cut the tail)
    p = torch.tensor([p if p < 1.0 else 2.0 for p in top_ps], device=probs.device, dtype=probs.dtype)
    before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the higher-ranked tokens
    drop = before >= p[:, None] * sorted_p.sum(dim=-1, keepdim=True)
    drop[:, 0] = False
    return probs.scatter(1, order, sorted_p.masked_fill(drop, 0.0))
