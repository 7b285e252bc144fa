"""Attention over the engine's KV-cache slots, registered with transformers as an attention function.

The KV cache is a preallocated tensor per layer, `[slots, kv_heads, max_model_len, head_dim]`. The
function writes each row's new keys and values into its slot and attends over that slot's prefix (a
view, no copy), so sequences of different lengths and positions share a batch without padding. A
decode step whose rows occupy a dense range of slots attends over the whole range in two batched
matrix products instead (`SlotSpan`), masked beyond each slot's length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ATTENTION = "sovllm_slots"


@dataclass
class Batch:
    """Where each row of the current forward pass lives in the KV cache."""

    keys: Any
    values: Any
    slots: list[int]
    starts: list[int]
    lengths: list[int]
    # where each row's real tokens begin in the padded input (left padding); 0 = no padding
    offsets: list[int] | None = None
    # a decode step over a dense range of slots: attended in one batched pass (`SlotSpan`)
    span: SlotSpan | None = None


@dataclass
class SlotSpan:
    """A decode step's rows as one contiguous range of cache slots, for batched attention.

    Attending row by row reads each slot's keys and values in small, single-threaded kernels; a decode
    step of 32 rows then spends about half its time there. Over a range of slots the same attention is
    two batched matrix products on views of the cache (no copy) with a mask beyond each slot's length:
    slots in the range that are not in the batch are computed and discarded. The engine makes sure the
    values under the mask are finite (zero where nothing was ever written), as 0 × NaN would leak.
    """

    lo: int
    hi: int  # exclusive
    slots: Any  # per row: its slot (long tensor)
    rows: Any  # per row: its slot's index within the range (long tensor)
    positions: Any  # per row: the cache position its new key and value go to (long tensor)
    width: int  # positions attended: the longest row's length after this step
    masked: Any  # [hi - lo, 1, 1, width] bool: True where a slot has no key (beyond its length, idle slots)

    @classmethod
    def build(cls, slots: list[int], lengths: list[int]) -> SlotSpan:
        import torch

        lo, hi = min(slots), max(slots) + 1
        slot_ids = torch.tensor(slots)
        rows = slot_ids - lo
        visible = torch.zeros(hi - lo, dtype=torch.long)  # idle slots in the range attend to nothing
        visible[rows] = torch.tensor(lengths) + 1
        width = int(visible.max())
        masked = torch.arange(width)[None, :] >= visible[:, None]
        return cls(lo, hi, slot_ids, rows, torch.tensor(lengths), width, masked[:, None, None, :])


def _span_attention(batch: Batch, layer: int, query, key, value, scaling):
    """One decode step's attention over a range of slots (see `SlotSpan`); returns [rows, 1, heads, dim]."""
    span = batch.span
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    keys, values = batch.keys[layer], batch.values[layer]
    keys[span.slots, :, span.positions] = key[:, :, 0]
    values[span.slots, :, span.positions] = value[:, :, 0]
    k = keys[span.lo:span.hi, :, :span.width]
    v = values[span.lo:span.hi, :, :span.width]
    q = query.new_zeros(span.hi - span.lo, heads, dim)
    q[span.rows] = query[:, :, 0]
    # grouped-query attention: query head h reads key/value head h // (heads // kv_heads)
    scores = (q.view(-1, kv_heads, heads // kv_heads, dim) @ k.transpose(-1, -2)).mul_(scaling)
    scores.masked_fill_(span.masked, float("-inf"))
    out = scores.softmax(dim=-1) @ v
    return out.view(-1, heads, dim)[span.rows].unsqueeze(1)


def _slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    sovllm_batch: Batch | None = None, **kwargs):
    """Attention over per-sequence cache slots (registered as a transformers attention function)."""
    import torch
    import torch.nn.functional as F

    batch = sovllm_batch
    layer = module.layer_idx
    rows, heads, q_len, dim = query.shape
    if batch.span is not None:
        return _span_attention(batch, layer, query, key, value,
                               scaling if scaling is not None else dim ** -0.5), None
    out = query.new_zeros(rows, q_len, heads, dim)
    for r in range(rows):
        slot, start, n = batch.slots[r], batch.starts[r], batch.lengths[r]
        o0 = batch.offsets[r] if batch.offsets else 0
        batch.keys[layer, slot, :, start:start + n] = key[r, :, o0:o0 + n]
        batch.values[layer, slot, :, start:start + n] = value[r, :, o0:o0 + n]
        k = batch.keys[layer, slot, :, :start + n].unsqueeze(0)
        v = batch.values[layer, slot, :, :start + n].unsqueeze(0)
        mask = None
        if n > 1 and start > 0:  # a chunk after a cached prefix: causal within, full over the prefix
            mask = torch.ones(n, start + n, dtype=torch.bool).tril(diagonal=start)
        o = F.scaled_dot_product_attention(query[r:r + 1, :, o0:o0 + n], k, v, attn_mask=mask,
                                           is_causal=(n > 1 and start == 0), scale=scaling, enable_gqa=True)
        out[r, o0:o0 + n] = o[0].transpose(0, 1)
    return out, None


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, _slot_attention)
    AttentionMaskInterface.register(ATTENTION, lambda *args, **kwargs: None)  # the slots are the mask
