"""Token sampling for one step: penalties, min_tokens bans, greedy / temperature, min-p, top-k, top-p, seeds.

Processing order (as vLLM): repetition, frequency and presence penalties -> banned tokens -> temperature ->
min-p -> top-k -> top-p -> sample. Fast paths: an all-greedy step is one argmax; greedy rows never compute a
softmax; rows without top-k / top-p draw from the whole distribution by inverse CDF (one cumulative sum and one
uniform number per row, instead of a random number per vocabulary entry); rows with top-k / top-p keep only
their ``topk`` candidates (the nucleus search widens them only while some row's nucleus is not inside yet) and
never sort the whole vocabulary unless a nucleus really spans it. Rows with a request seed take their uniform
number from a generator seeded by (seed, output position), so the same seed gives the same tokens whatever else
is in the batch. Logprobs are those of the raw model distribution (before penalties and temperature), like vLLM's
default.
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
        rows = [i for i, g in enumerate(greedy) if not g]
        sampled = logits.argmax(dim=-1) if any(greedy) else torch.empty(len(greedy), dtype=torch.long,
                                                                         device=logits.device)
        index = torch.tensor(rows, device=logits.device)
        temps = torch.tensor([batch.temperatures[i] for i in rows], device=logits.device)
        probs = torch.softmax((logits if len(rows) == len(greedy) else logits[index]) / temps[:, None], dim=-1)
        min_ps = [batch.min_ps[i] for i in rows]
        if any(p > 0 for p in min_ps):
            min_p = torch.tensor(min_ps, device=logits.device)
            probs = probs.masked_fill(probs < probs.amax(dim=-1, keepdim=True) * min_p[:, None], 0.0)
        uniform = self._uniform([batch.seeds[i] for i in rows], [batch.output_positions[i] for i in rows])
        top_ks, top_ps = [batch.top_ks[i] for i in rows], [batch.top_ps[i] for i in rows]
        cut = [k > 0 or p < 1.0 for k, p in zip(top_ks, top_ps, strict=True)]
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        for want in (False, True):
            part = [j for j, c in enumerate(cut) if c == want]
            if not part:
                continue
            sub = torch.tensor(part, device=logits.device)
            p = probs if len(part) == len(rows) else probs[sub]
            if want:
                cand, ids = _top_k_top_p(p, [top_ks[j] for j in part], [top_ps[j] for j in part])
                tokens[sub] = ids.gather(1, _draw(cand, uniform[sub])[:, None])[:, 0]
            else:
                tokens[sub] = _draw(p, uniform[sub])
        sampled[index] = tokens
        return sampled

    def _uniform(self, seeds: list[int | None], positions: list[int]) -> torch.Tensor:
        """One uniform number in [0, 1) per row: the engine's generator, or the row's (seed, output position)."""
        u = torch.rand(len(seeds), generator=self.generator, device=self.device)
        for i, seed in enumerate(seeds):
            if seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(seed_for(seed, positions[i]))
                u[i] = torch.rand(1, generator=gen, device=self.device)[0]
        return u

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


def _draw(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Column drawn from each row of non-negative ``weights`` (any scale) by inverse CDF with ``uniform`` in [0, 1).

    ``1 - u`` is in (0, 1], so the first column whose cumulative weight reaches it has a positive weight."""
    cdf = weights.cumsum(dim=-1)
    target = (1.0 - uniform.to(cdf.dtype))[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target)[:, 0].clamp_(max=weights.shape[1] - 1)


def _top_k_top_p(probs: torch.Tensor, top_ks: list[int], top_ps: list[float],
                 start: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's candidates in descending order: their probabilities (zero outside the row's top-k and its
    smallest top-p nucleus) and token ids, [rows, K]. K is the largest top-k; with a row without top-k, at least
    ``start``, widened 4x while such a row's nucleus is not inside K yet (the whole vocabulary is sorted only then)."""
    vocab = probs.shape[1]
    ks = [k if 0 < k < vocab else vocab for k in top_ks]
    width = max(ks) if vocab not in ks else min(vocab, max([k for k in ks if k < vocab] + [start]))
    # top-p over what top-k kept; p >= 1 never drops (rounding in the cumsum must not cut the tail)
    p = torch.tensor([p if p < 1.0 else 2.0 for p in top_ps], device=probs.device, dtype=probs.dtype)
    k = torch.tensor(ks, device=probs.device)
    unbounded = torch.tensor([k == vocab for k in ks], device=probs.device)
    total = probs.sum(dim=-1, keepdim=True)  # the mass top-k keeps when a row has no top-k
    while True:
        cand, ids = probs.topk(width, dim=-1)
        ranks = torch.arange(width, device=probs.device)[None, :]
        cand = cand.masked_fill(ranks >= k[:, None], 0.0)
        kept = torch.where(unbounded[:, None], total, cand.sum(dim=-1, keepdim=True))
        cum = cand.cumsum(dim=-1)
        # a row whose top-k is unbounded needs its nucleus inside the candidates (or every token)
        inside = ~unbounded | (cum[:, -1] >= p * kept[:, 0])
        if width == vocab or bool(inside.all()):
            break
        width = min(vocab, width * 4)
    drop = (cum - cand) >= p[:, None] * kept  # mass of the higher-ranked tokens already reaches p
    drop[:, 0] = False
    return cand.masked_fill(drop, 0.0), ids
