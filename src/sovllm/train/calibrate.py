"""Refusal calibration: move the adapter's greedy refusal decision to where the val split says it belongs.

A greedy answer starts with the refusal sentence when its first token wins the first step and its
second token wins the second. An adapter's refusals depend on the context (the separation of its
refusal score, docs/eval.md), but its greedy decision can sit too far towards refusing: the refusal
is one memorised sentence, while the probability of an answer's first token is spread over many.
One number moves it: a bias added to the logits of the refusal sentence's first two tokens while the
answer so far is that sentence's beginning. With bias b an item is refused exactly when

    margin + b >= 0,   margin = min over both steps of (logit of the refusal token - best other logit),

so one teacher-forced forward pass per val item (prompt + first refusal token) gives each item's
margin, and the bias is chosen on those margins: the most refusals of unanswerable val items with at
most `max_false_refusals` of the answerable ones refused, placed midway between the two val items
it separates. The result is stored in the adapter's `manifest.json` (`refusal_calibration`) and
applied by sovllm's engine to every request for that adapter; other servers (vLLM) ignore it.
"""

from __future__ import annotations

from sovllm.models.adapter import RefusalCalibration

STEPS = 2  # tokens of the refusal sentence the bias applies to


def refusal_token_ids(tokenizer, refusal: str) -> list[int]:
    """The first tokens of the refusal sentence as an answer starts with it (as training encodes it)."""
    return tokenizer(refusal.strip(), add_special_tokens=False)["input_ids"][:STEPS]


def margins(model, prompts: list[list[int]], token_ids: list[int], *, pad_id: int, batch_size: int = 8) -> list[float]:
    """Per prompt: min over the refusal's first tokens of (its logit - the best other logit), teacher-forced.

    Greedy decoding starts with the refusal sentence exactly when this is >= 0 (ties aside)."""
    import torch

    model.eval()
    tokens = torch.tensor(token_ids)
    out: list[float] = []
    k = len(token_ids)
    with torch.inference_mode():
        for b in range(0, len(prompts), batch_size):
            rows = [p + token_ids[:-1] for p in prompts[b:b + batch_size]]
            width = max(map(len, rows))
            # left-padded, so every row's last k positions are the ones scored and only they are projected
            ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=k).logits
            for steps in logits.float():
                own = steps[torch.arange(k), tokens]
                others = steps.scatter(1, tokens[:, None], float("-inf")).max(dim=1).values
                out.append(float((own - others).min()))
    return out


def choose_bias(unanswerable: list[float], answerable: list[float], max_false_refusals: float) -> float:
    """The bias that refuses the most unanswerable items while refusing at most `max_false_refusals` of
    the answerable ones (margins as `margins` returns them), midway between the items it separates."""
    if not unanswerable or not answerable:
        raise ValueError("calibration needs answerable and unanswerable items")
    allowed = int(max_false_refusals * len(answerable) + 1e-9)  # answerable items that may be refused
    ranked = sorted(answerable, reverse=True)
    # refuse everything strictly above the first answerable margin that must stay answered
    ceiling = ranked[allowed] if allowed < len(ranked) else float("-inf")
    above = [m for m in unanswerable + ranked[:allowed] if m > ceiling]
    if not above:  # nothing can be refused: keep every item below the threshold, closest to the ceiling
        return -(ceiling + 1.0)
    lowest = min(above)
    if ceiling == float("-inf"):
        return -(lowest - 1.0) if lowest < 0 else 0.0
    return -(lowest + ceiling) / 2


def rates(unanswerable: list[float], answerable: list[float], bias: float) -> dict:
    refused_u = sum(m + bias >= 0 for m in unanswerable)
    refused_a = sum(m + bias >= 0 for m in answerable)
    return {"refusal_accuracy": round(refused_u / max(1, len(unanswerable)), 4),
            "false_refusals": round(refused_a / max(1, len(answerable)), 4),
            "refused_unanswerable": refused_u, "refused_answerable": refused_a}


def calibrate(model, examples, unanswerable_flags: list[bool], token_ids: list[int], *, pad_id: int,
              max_false_refusals: float) -> RefusalCalibration | None:
    """Margins on the val examples and the bias chosen on them; None without both kinds of item."""
    if not any(unanswerable_flags) or all(unanswerable_flags) or len(token_ids) < 1:
        return None
    values = margins(model, [e.prompt_ids for e in examples], token_ids, pad_id=pad_id)
    u = [m for m, flag in zip(values, unanswerable_flags) if flag]
    a = [m for m, flag in zip(values, unanswerable_flags) if not flag]
    bias = choose_bias(u, a, max_false_refusals)
    return RefusalCalibration(token_ids, bias, max_false_refusals,
                              {"unanswerable": len(u), "answerable": len(a), "before": rates(u, a, 0.0),
                               "after": rates(u, a, bias)})
