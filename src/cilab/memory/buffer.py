"""A fixed-size exemplar store: uint8 images per class, kept in selection order."""

from __future__ import annotations

import torch


class ExemplarMemory:
    """Exemplars of every seen class, as uint8 images (so they are augmented like new data).

    iCaRL: with K exemplars in total and n classes seen, every class keeps
    m = floor(K / n); old classes are cut to their first m, which herding
    ordered by importance, so cutting keeps the best.
    """

    def __init__(self, size: int):
        self.size = size
        self.per_class: dict[int, torch.Tensor] = {}

    def per_class_quota(self, n_seen: int) -> int:
        return self.size // n_seen if n_seen else 0

    def reduce(self, m: int) -> None:
        # clone: a slice would keep (and torch.save would write) the whole old tensor
        for c in self.per_class:
            self.per_class[c] = self.per_class[c][:m].clone()

    def add(self, label: int, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8:
            raise TypeError(f"exemplars are stored as uint8 images, got {images.dtype}")
        self.per_class[int(label)] = images

    def __len__(self) -> int:
        return sum(len(v) for v in self.per_class.values())

    @property
    def classes(self) -> list[int]:
        return sorted(self.per_class)

    def data(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """All exemplars and their labels (output indices), classes in order."""
        if not self.per_class:
            return torch.empty(0, 3, 32, 32, dtype=torch.uint8, device=device), torch.empty(0, dtype=torch.int64, device=device)
        xs = [self.per_class[c] for c in self.classes]
        ys = [torch.full((len(x),), c, dtype=torch.int64, device=x.device) for c, x in zip(self.classes, xs)]
        return torch.cat(xs), torch.cat(ys)

    def state_dict(self) -> dict:
        return {"size": self.size, "per_class": {c: x.cpu() for c, x in self.per_class.items()}}

    @classmethod
    def from_state_dict(cls, state: dict, device=None) -> "ExemplarMemory":
        mem = cls(state["size"])
        mem.per_class = {int(c): x.to(device) for c, x in state["per_class"].items()}
        return mem
