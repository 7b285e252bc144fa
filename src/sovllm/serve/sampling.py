"""Per-sequence sampling state: parameters, the next-token choice, and incremental detokenization.

Sampling follows vLLM's semantics: `temperature: 0` is greedy; `top_p` keeps the smallest set of
tokens whose probability reaches p; a `seed` gives each sequence its own generator (sequence i of
a request with seed s uses s + i); `min_tokens` forbids stop tokens until that many tokens exist;
`ignore_eos` keeps generating through them. Log-probabilities are those of the raw model
distribution (before temperature, top-p and grammar masks), as vLLM reports by default.
Structured output masks the logits with the grammar's allowed-token bitmask (xgrammar) before
choosing, so the output follows the grammar by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: bool = False
    top_logprobs: int = 0


class Detokenizer:
    """Turns a growing token list into text deltas, holding back text that might start a stop string.

    Decodes only a small window of recent tokens per step (prefix/read offsets), so the cost per
    token stays constant; an incomplete UTF-8 character (decoded as U+FFFD) waits for its next token.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of `text` already emitted
        self.stopped = False

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        """Add a token; return the text that can be emitted now."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        current = self._decode(self.tokens[self.prefix_offset:])
        if len(current) > len(prefix) and not current.endswith("\ufffd"):
            self.text += current[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        if self.stop:
            hits = [(self.text.find(s, max(0, self.sent - len(s))), s) for s in self.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                self.text = self.text[:min(i for i, _ in hits)]
                self.stopped = True
                return ""
        safe = len(self.text) - self._held_back()
        if safe <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent:safe], safe
        return delta

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def finish(self) -> str:
        """Everything not yet emitted (the held-back tail), at the end of the sequence."""
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta


@dataclass
class Sequence:
    """One output sequence (a request with `n > 1` has several) and its place in the KV cache."""

    request: Any
    index: int
    slot: int
    length: int  # tokens in the cache (prompt + generated, minus the last sampled token)
    joined_step: int
    detok: Detokenizer
    tokens: list[int] = field(default_factory=list)
    last_token: int = 0
    finished_step: int | None = None
    last_at: float = 0.0  # monotonic time of the last token (inter-token latency)
    generator: Any = None
    matcher: Any = None
    bitmask: Any = None

    def setup(self, vocab_size: int) -> None:
        import torch

        params = self.request.params
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed + self.index)
        if self.request.grammar is not None:
            import xgrammar as xgr

            self.matcher = xgr.GrammarMatcher(self.request.grammar)
            self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)


def _logprob_entries(logprobs, token: int, top: int) -> dict:
    import torch

    entry = {"token_id": token, "logprob": float(logprobs[token]), "top": []}
    if top:
        values, indices = torch.topk(logprobs, top)
        entry["top"] = [(int(i), float(v)) for v, i in zip(values, indices)]
    return entry


def sample_next(seq: Sequence, logits, stop_ids: set[int], refusal=None) -> tuple[int, dict | None]:
    """Choose the next token for `seq` from its raw logits; also return its log-probability entry.
    `refusal` is the adapter's RefusalCalibration (sovllm.models.adapter) or None; it applies the
    request's own `refusal_bias` (None: no bias)."""
    import torch

    params = seq.request.params
    raw = logits
    logits = logits.clone()
    bias = getattr(seq.request, "refusal_bias", None)
    if refusal is not None and bias is not None:
        refusal.apply(logits, seq.tokens, bias)
    if seq.matcher is not None:
        import xgrammar as xgr

        seq.matcher.fill_next_token_bitmask(seq.bitmask, 0)
        xgr.apply_token_bitmask_inplace(logits.unsqueeze(0), seq.bitmask)
    if len(seq.tokens) < params.min_tokens:
        blocked = [t for t in (stop_ids | set(params.stop_token_ids)) if t < logits.shape[-1]]
        kept = logits[blocked].clone()
        logits[blocked] = float("-inf")
        if not torch.isfinite(logits).any():
            logits[blocked] = kept  # the grammar allows only a stop token now: the output ends (JSON complete)
    if params.temperature <= 1e-5:
        token = int(torch.argmax(logits))
    else:
        logits = logits / params.temperature
        probs = torch.softmax(logits, dim=-1)
        if params.top_p < 1.0:
            # the nucleus almost always lies in the top few hundred tokens: sort those only, and
            # fall back to the full sort when they do not reach top_p (so the result is exact)
            sorted_probs, order = torch.topk(probs, min(512, probs.shape[-1]))
            if float(sorted_probs.sum()) < params.top_p:
                sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
            keep[0] = True
            filtered = torch.zeros_like(probs)
            filtered[order[keep]] = sorted_probs[keep]
            probs = filtered / filtered.sum()
        token = int(torch.multinomial(probs, 1, generator=seq.generator))
    if seq.matcher is not None and not seq.matcher.is_terminated():
        seq.matcher.accept_token(token)
    entry = None
    if params.logprobs:
        entry = _logprob_entries(torch.log_softmax(raw, dim=-1), token, params.top_logprobs)
    return token, entry
