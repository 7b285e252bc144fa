"""Refusal calibration: move the adapter's greedy refusal decision to where the val split says it belongs.

A greedy answer starts with the refusal sentence when its first token wins the first step and its
second token wins the second. An adapter's refusals depend on the context (the separation of its
refusal score, docs/experiments/2026-12-01-refusal-separation.md), but its greedy decision can sit too far towards refusing: the refusal
is one memorised sentence, while the probability of an answer's first token is spread over many.
One number moves it: a bias added to the logits of the refusal sentence's first two tokens while the
answer so far is that sentence's beginning. With bias b an item is refused exactly when

    margin + b >= 0,   margin = min over both steps of (logit of the refusal token - best other logit),

so one teacher-forced forward pass over the val prompts and the first refusal token (questions on
one context as a shared-prefix tree) gives each item's margin, and the bias is chosen on those margins: the most refusals of unanswerable val items with at
most `max_false_refusals` of the answerable ones refused, placed midway between the two val items
it separates.

The margin separates unanswerable from answerable items only partly (on the example project the
best threshold refuses 25 of 36 unanswerable eval items at 7 of 72 false refusals); a question
asked about a context that lacks its key words is the typical unanswerable case, and the
question's lexical support in the context (`sovllm.models.grounding`: the IDF-weighted share of
its words that occur there) measures that. An on-topic unanswerable question (same section, the
asked fact missing) keeps most of its words in the context, but spread over several lines: no line
holds most of them, as the answering line of an answerable question does, so the same share within
the context's best line (line support) adds what the whole-context share cannot see. With
`train.refusal_support` the decision score is margin - w * support - v * line support, so the bias
per request is b - w * support - v * line support; w and v are chosen on val too (the most
unanswerable items refused within the allowance, then the best AUC, then the smallest weights). The
result is stored in the adapter's `manifest.json` (`refusal_calibration`, with the training
contexts' document frequencies) and applied by sovllm's engine to every request for that adapter
whose user turn has the training format, and by vLLM with sovllm's plugin; other servers ignore it.
"""

from __future__ import annotations

import itertools

from sovllm.curate.negatives import on_topic_context, overlap
from sovllm.models.adapter import RefusalCalibration
from sovllm.models.grounding import Vocabulary
from sovllm.models.prompt import record_turn, user_turn
from sovllm.stats import roc_auc
from sovllm.train.data import IGNORE, Collator, Example, share_prefixes

STEPS = 2  # tokens of the refusal sentence the bias applies to
WEIGHTS = tuple(0.5 * i for i in range(41))  # support weights tried on val: 0, 0.5, ..., 20


def refusal_token_ids(tokenizer, refusal: str) -> list[int]:
    """The first tokens of the refusal sentence as an answer starts with it (as training encodes it)."""
    return tokenizer(refusal.strip(), add_special_tokens=False)["input_ids"][:STEPS]


def margins(model, prompts: list[list[int]], token_ids: list[int], *, pad_id: int,
            share_keys: list | None = None, max_tokens: int = 4096) -> list[float]:
    """Per prompt: min over the refusal's first tokens of (its logit - the best other logit), teacher-forced.

    Greedy decoding starts with the refusal sentence exactly when this is >= 0 (ties aside). Prompts
    with the same share key (the prompt up to the question: one context, several questions) are
    computed as one shared-prefix tree (`data.Tree`), the context once."""
    import torch


    keys = share_keys or [None] * len(prompts)
    probes = [Example(str(i), list(p), list(token_ids), key) for i, (p, key) in enumerate(zip(prompts, keys))]
    k = len(token_ids)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(base.parameters()).device
    tokens = torch.tensor(token_ids, device=device)
    collate = Collator(pad_id)
    out: list[float] = [0.0] * len(prompts)
    model.eval()
    with torch.inference_mode():
        for tree in share_prefixes(probes, max_tokens=max_tokens):
            batch = {key: value.to(device) for key, value in collate([tree.feature()]).items()}
            hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["tree_mask"],
                                        position_ids=batch["position_ids"]).last_hidden_state
            labelled = batch["labels"][:, 1:] != IGNORE  # the positions that predict a refusal token, branch by branch
            logits = base.get_output_embeddings()(hidden[:, :-1][labelled]).float().view(len(tree.ids), k, -1)
            own = logits[:, torch.arange(k), tokens]
            others = logits.scatter(2, tokens.expand(len(tree.ids), k)[:, :, None], float("-inf")).max(dim=2).values
            for i, value in zip(tree.ids, (own - others).min(dim=1).values.tolist()):
                out[int(i)] = value
    return out


def _meta(record: dict) -> dict:
    return record.get("meta") or {}


def _refused(record: dict, context: str, question: str, refusal: str, suffix: str, kind: str) -> dict:
    """`record`'s question asked about `context`, answered with the refusal sentence."""
    system = [m for m in record["messages"] if m.get("role") == "system"]
    return {"id": f"{record.get('id')}-calibration-{suffix}",
            "messages": system + [{"role": "user", "content": user_turn(context, question)},
                                  {"role": "assistant", "content": refusal.strip()}],
            "meta": {**_meta(record), "type": "unanswerable", "negative": kind, "question": question}}


def foreign_val_records(records: list[dict], refusal: str, max_overlap: float) -> list[dict]:
    """More unanswerable items for the calibration, built as curate builds them: each answerable val
    question asked about a context of another val document, the one it shares the most content words
    with among those sharing at most `max_overlap` of them (a hard negative that is still not
    answerable); none when val has a single document. Records in the train/val.jsonl format."""
    contexts: dict[str, str] = {}  # context text -> its document
    for record in records:
        parts = record_turn(record)
        if parts and _meta(record).get("type") != "unanswerable":
            contexts.setdefault(parts[0], str(_meta(record).get("doc_id")))
    out = []
    for record in records:
        parts = record_turn(record)
        if not parts or _meta(record).get("type") == "unanswerable":
            continue
        question, doc = parts[1], str(_meta(record).get("doc_id"))
        scored = [(overlap(question, text), text) for text, other in contexts.items() if other != doc]
        allowed = [(shared, text) for shared, text in scored if shared <= max_overlap]
        if not allowed:
            continue
        _, text = max(allowed, key=lambda s: s[0])  # first of the most overlapping (dict order: stable)
        out.append(_refused(record, text, question, refusal, "foreign", "foreign"))
    return out


def on_topic_val_records(records: list[dict], refusal: str, max_overlap: float) -> list[dict]:
    """On-topic unanswerable items for the calibration, built as curate builds them: each answerable
    val question asked about its own context with the answer-bearing sentences removed, where the
    answer is then really absent (`curate.negatives.on_topic_context`)."""
    out = []
    for record in records:
        parts = record_turn(record)
        if not parts or _meta(record).get("type") == "unanswerable":
            continue
        answer = next((m.get("content") for m in reversed(record["messages"]) if m.get("role") == "assistant"), "")
        left = on_topic_context(parts[0], parts[1], answer or "", max_overlap, kind=_meta(record).get("type"))
        if left is not None:
            out.append(_refused(record, left, parts[1], refusal, "on-topic", "on_topic"))
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


def choose_weight(margins_u: list[float], margins_a: list[float], support_u: list[float], support_a: list[float],
                  max_false_refusals: float) -> float:
    """The support weight w (from WEIGHTS) for the score margin - w * support that refuses the most
    unanswerable val items within the false-refusal allowance; ties go to the better ROC AUC, then
    to the smaller weight."""
    return choose_weights(margins_u, margins_a, [(s,) for s in support_u], [(s,) for s in support_a],
                          max_false_refusals)[0]


def choose_weights(margins_u: list[float], margins_a: list[float], features_u: list[tuple[float, ...]],
                   features_a: list[tuple[float, ...]], max_false_refusals: float) -> tuple[float, ...]:
    """Weights (each from WEIGHTS) for the score margin - sum(w_i * feature_i) that refuse the most
    unanswerable val items within the false-refusal allowance; ties go to the better ROC AUC, then
    to the smaller weights (the first feature's first)."""
    k = len(features_u[0]) if features_u else 0
    best, chosen = None, (0.0,) * k
    for ws in itertools.product(WEIGHTS, repeat=k):
        u = [m - sum(w * f for w, f in zip(ws, fs)) for m, fs in zip(margins_u, features_u)]
        a = [m - sum(w * f for w, f in zip(ws, fs)) for m, fs in zip(margins_a, features_a)]
        key = (rates(u, a, choose_bias(u, a, max_false_refusals))["refused_unanswerable"], roc_auc(u, a))
        if best is None or key > best:
            best, chosen = key, ws
    return chosen


def calibrate(model, examples, unanswerable_flags: list[bool], token_ids: list[int], *, pad_id: int,
              max_false_refusals: float, support: list[tuple[float, float]] | None = None,
              vocabulary: Vocabulary | None = None) -> RefusalCalibration | None:
    """Margins on the val examples and the bias chosen on them; None without both kinds of item.

    With `support` (each example's (lexical support, line support), computed with `vocabulary`)
    the decision score is margin - w * support - v * line support, w and v chosen on val as well
    (`choose_weights`)."""
    if not any(unanswerable_flags) or all(unanswerable_flags) or len(token_ids) < 1:
        return None
    values = margins(model, [e.prompt_ids for e in examples], token_ids, pad_id=pad_id,
                     share_keys=[e.share_key for e in examples])
    u = [m for m, flag in zip(values, unanswerable_flags) if flag]
    a = [m for m, flag in zip(values, unanswerable_flags) if not flag]
    weights = (0.0, 0.0)
    if support is not None and vocabulary is not None:
        f_u = [s for s, flag in zip(support, unanswerable_flags) if flag]
        f_a = [s for s, flag in zip(support, unanswerable_flags) if not flag]
        weights = choose_weights(u, a, f_u, f_a, max_false_refusals)
        scored_u = [m - sum(w * f for w, f in zip(weights, fs)) for m, fs in zip(u, f_u)]
        scored_a = [m - sum(w * f for w, f in zip(weights, fs)) for m, fs in zip(a, f_a)]
    else:
        scored_u, scored_a = u, a
    bias = choose_bias(scored_u, scored_a, max_false_refusals)
    return RefusalCalibration(token_ids, bias, max_false_refusals,
                              {"unanswerable": len(u), "answerable": len(a), "before": rates(u, a, 0.0),
                               "after": rates(scored_u, scored_a, bias)},
                              weights[0], vocabulary if any(weights) else None, weights[1])
