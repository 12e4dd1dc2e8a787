"""`packed_sdpa`: attention for packed rows, one causal SDPA per packed example.

Packing puts several examples in one row, with position ids restarting at 0 for each (jobs/data/tokenize.py).
With "sdpa", transformers turns those restarts into a dense L x L block-diagonal mask, and SDPA computes
all L^2 scores of the row before masking most of them away. "packed_sdpa" cuts the row at the restarts and
runs causal SDPA on each example alone: the same attention, from sum(n_i^2) scores instead of L^2. The assistant
recipe's examples average 43 tokens, so its rows need a small part of their L^2 scores; on this CPU its training
rows run 1.31x faster (docs/benchmarks.md, `python -m jobs.bench.train_step --compare attention`).

The examples are read from the position ids alone, as collate makes them (padding is its own example);
any 2D padding mask of a packed row is not consulted. Everything that is not a packed row (generation
with a KV cache, one example, a row without restarts) goes to transformers' own sdpa, mask and all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "packed_sdpa"


def example_starts(position_ids: torch.Tensor) -> list[list[int]]:
    """For each row, where each packed example starts: the indices whose position id is 0 (and index 0)."""
    return [sorted({0, *(row == 0).nonzero().flatten().tolist()}) for row in position_ids]


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          position_ids: torch.Tensor | None = None, **kwargs):
    """transformers' attention interface: query [B, H, L, D], key/value [B, H_kv, L, D] -> [B, L, H, D]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length = query.shape[2]
    starts = None
    if position_ids is not None and key.shape[2] == length > 1 and position_ids.shape == (query.shape[0], length):
        starts = example_starts(position_ids)
    if starts is None or all(len(row) == 1 for row in starts):  # not a packed row: transformers' sdpa as is
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b, row_starts in enumerate(starts):
        parts = [F.scaled_dot_product_attention(query[b:b + 1, :, i:j], key[b:b + 1, :, i:j], value[b:b + 1, :, i:j],
                                                dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)
                 for i, j in zip(row_starts, row_starts[1:] + [length])]
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make "packed_sdpa" an attn_implementation for from_pretrained; its masks are sdpa's (for the
    non-packed calls that use them)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
