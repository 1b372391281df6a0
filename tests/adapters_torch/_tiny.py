"""A small model shared by the distributed tests (DDP and FSDP2)."""

from __future__ import annotations

import torch

from compressm_torch import LRU, S5


class Tiny(torch.nn.Module):
    """An LRU and an S5 layer (16 states each) and a linear read-out.

    The output is a copy (``clone``), never a view of an activation, so that FSDP2's hooks
    and DDP see a fresh tensor.
    """

    def __init__(self):
        super().__init__()
        self.lru = LRU(4, 16)
        self.s5 = S5(4, 16)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.s5(self.lru(x))).clone()
