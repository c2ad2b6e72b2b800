"""The one target vocabulary: ``int | list[int] | LongTensor (B,) | None``, where None means the predicted top-1."""

from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence

import torch

TargetLike = int | Sequence[int] | torch.Tensor | None


@torch.no_grad()
def predicted_classes(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                      max_batch: int | None = None) -> torch.LongTensor:
    """``argmax_c f(x)[:, c]`` per image (B,), ``max_batch`` images per forward pass (None: all at once)."""
    n = x.shape[0]
    step = n if not max_batch else max_batch
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    return torch.cat([f(x[i:i + step]).argmax(1) for i in range(0, n, step)]).to(x.device)


def check_targets(target: Any, b: int, c: int | None, device: torch.device | str | None = None,
                  name: str = "target") -> torch.LongTensor:
    """int | list[int] | LongTensor (B,) -> LongTensor (B,) of class indices in [0, c - 1] (c None: >= 0);
    clear errors otherwise."""
    if target is None:
        raise TypeError(f"{name}: expected int | list[int] | LongTensor (B,), got None")
    if isinstance(target, bool):
        raise TypeError(f"{name}: expected int | list[int] | LongTensor (B,) | None, got bool")
    if isinstance(target, numbers.Integral):
        t = torch.full((b,), int(target), dtype=torch.long, device=device)
    elif isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"{name}: expected an integer (Long) tensor of class indices, got dtype {target.dtype}")
        if target.dim() == 0:
            target = target.expand(b)
        if target.dim() != 1 or target.shape[0] != b:
            raise ValueError(f"{name}: expected shape ({b},) (one class per image), got {tuple(target.shape)}")
        t = target.to(device=device, dtype=torch.long)
    elif isinstance(target, Sequence) and not isinstance(target, str):
        if len(target) != b:
            raise ValueError(f"{name}: expected {b} class indices (one per image), got {len(target)}")
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in target):
            raise TypeError(f"{name}: expected a list of ints, got {list(target)!r}")
        t = torch.tensor([int(v) for v in target], dtype=torch.long, device=device)
    else:
        raise TypeError(f"{name}: expected int | list[int] | LongTensor (B,) | None, got {type(target).__name__}")
    if c is None:  # no known class count: indices must only be >= 0
        if t.numel() and int(t.min()) < 0:
            raise ValueError(f"{name}: class indices must be >= 0, got {t[t < 0].tolist()}")
        return t
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= c):
        bad = t[(t < 0) | (t >= c)].tolist()
        raise ValueError(f"{name}: class indices must lie in [0, {c - 1}] for this {c}-class explanandum, "
                         f"got {bad}")
    return t


def resolve_targets(f: Any, x: torch.Tensor, target: TargetLike, max_batch: int | None = None,
                    name: str = "target") -> torch.LongTensor:
    """``target`` as a LongTensor (B,) on ``x``'s device; ``None`` is the predicted top-1 class of each image.

    An int applies to every image; a list or a tensor gives one class per image (a 0-d tensor counts as an int).
    Indices are checked against ``f.num_classes`` when ``f`` has one.
    """
    if target is None:
        return predicted_classes(f, x, max_batch)
    return check_targets(target, x.shape[0], getattr(f, "num_classes", None), x.device, name=name)
