"""Weighted sums of table rows: the one primitive both pure ops are built on.

`weighted_rows(table, index, weight)` returns, for each bag (a row of `index`), the sum of
`weight * table[index]` over that bag's entries: one `F.embedding_bag(mode="sum",
per_sample_weights=...)` call, which reads the table rows directly and never materialises the
[bags, entries, channels] tensor a gather-then-sum would (nor saves it for backward). Autograd
runs through both the table and the weights. Where embedding_bag has no kernel for the device
(MPS, XPU and other backends vary), the same sum is an index_select, a multiply and a sum.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: Device types whose embedding_bag (forward and both backward paths) is used; others take
#: the gather-multiply-sum formulation. Tests force the latter by emptying this set.
EMBEDDING_BAG_DEVICES = {"cpu", "cuda"}


def weighted_rows(table: Tensor, index: Tensor, weight: Tensor, offsets: Tensor | None = None) -> Tensor:
    """Per-bag weighted sums of `table` [N, C] rows -> [bags, C].

    index / weight: [bags, entries] (every bag the same length), or 1-D with `offsets`
    [bags] giving where each bag starts (bags of any length, empty ones sum to zero).
    """
    if table.device.type in EMBEDDING_BAG_DEVICES:
        return F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weight)
    if offsets is None:
        rows = table.index_select(0, index.reshape(-1)).view(*index.shape, table.shape[1])
        return (rows * weight.unsqueeze(-1)).sum(1)
    bags = offsets.shape[0]
    bag_of_entry = torch.bucketize(torch.arange(index.shape[0], device=index.device), offsets, right=True) - 1
    out = table.new_zeros(bags, table.shape[1])
    return out.index_add(0, bag_of_entry, table.index_select(0, index) * weight.unsqueeze(-1))
