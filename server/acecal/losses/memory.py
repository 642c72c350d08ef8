"""Measuring what a loss keeps alive for its backward pass (the memory budgets in benchmarks/RESULTS.md)."""

from __future__ import annotations

from typing import Callable

import torch


def saved_bytes_per_element(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], logits: torch.Tensor, target: torch.Tensor
) -> float:
    """Unique storages (keyed by data pointer) that autograd saves for backward, in bytes per (voxel x class).

    Runs ``loss_fn(logits, target)`` once on a fresh leaf copy of ``logits`` (B, C, spatial...); a softmax inside the
    loss counts its output. Raises ``ValueError`` if the result does not require grad (nothing would be saved).
    """
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    x = logits.detach().clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(x, target)
    if not loss.requires_grad:
        raise ValueError("the loss does not require grad: nothing is saved for backward")
    del loss
    return sum(storages.values()) / logits.numel()
