"""BachGAN Background Retrieval Module (online) and the box pasting of retrieved maps.

The memory bank (class maps of the training split) and the foreground class set are buffers of
:class:`BackgroundMemory`, so they travel with the checkpoint: ``fastvl gan synthesize`` retrieves backgrounds for
user-drawn boxes. Retrieval ranks the bank with :func:`fastvl.ops.layout_retrieval` (per-map class counts cached in a
:class:`fastvl.ops.LayoutMemory`); in training the query's own map is excluded.

The official code retrieves offline and applies the query's flip / crop to the retrieved maps; fastvl retrieves
online with the (already transformed) box masks as the query, so the retrieved maps match the boxes as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...ops import LayoutMemory, layout_retrieval
from .config import BachGANConfig

__all__ = ["BackgroundMemory", "paste_boxes"]


def paste_boxes(maps: torch.Tensor, box_mask: torch.Tensor, foreground: torch.Tensor,
                ignore_index: int = 255) -> torch.Tensor:
    """Paste the query's boxes into retrieved class maps.

    Each map is one-hot encoded to C channels (``ignore_index`` pixels: all zero), every channel is zeroed inside
    the union of the query's boxes, then the foreground channels are overwritten with the query's box masks.

    Args:
        maps: [N, k, H, W] integer class maps (ids in [0, C) or ``ignore_index``).
        box_mask: [N, C, H, W] bool per-class box masks of the query.
        foreground: [C] bool, the foreground classes.
    Returns:
        [N, k, C, H, W] float32.
    """
    n, k, h, w = maps.shape
    c = box_mask.shape[1]
    if box_mask.shape != (n, c, h, w):
        raise ValueError(f"paste_boxes: 'box_mask' must be [N={n}, C, H={h}, W={w}], got {list(box_mask.shape)}")
    if foreground.shape != (c,):
        raise ValueError(f"paste_boxes: 'foreground' must be [C={c}] bool, got {list(foreground.shape)}")
    labels = maps.long()
    valid = labels != ignore_index
    onehot = F.one_hot(torch.where(valid, labels, c), c + 1)[..., :c]  # [N, k, H, W, C]
    onehot = onehot.permute(0, 1, 4, 2, 3).to(torch.float32)
    union = box_mask.any(dim=1)  # [N, H, W]
    onehot = onehot * (~union)[:, None, None].to(torch.float32)
    fg = foreground.to(torch.bool)
    onehot[:, :, fg] = box_mask[:, None, fg].to(torch.float32).expand(n, k, -1, h, w)
    return onehot


class BackgroundMemory(nn.Module):
    """The memory bank: ``maps`` [M, H, W] uint8 (int16 when C > 255) class maps, ``source_index`` [M] int64 (the
    training-set index of each map, used to exclude a query's own map) and ``foreground`` [C] bool. All buffers."""

    def __init__(self, cfg: BachGANConfig):
        super().__init__()
        self.cfg = cfg
        dtype = torch.uint8 if cfg.label_nc <= 255 and cfg.ignore_index <= 255 else torch.int16
        self.register_buffer("maps", torch.zeros(cfg.memory_size, cfg.height, cfg.width, dtype=dtype))
        self.register_buffer("source_index", torch.full((cfg.memory_size,), -1, dtype=torch.int64))
        fg = torch.zeros(cfg.label_nc, dtype=torch.bool)
        fg[list(cfg.foreground)] = True
        self.register_buffer("foreground", fg)
        self._bank: tuple | None = None

    def fill(self, maps: torch.Tensor, source_index: torch.Tensor | None = None) -> None:
        """Set the bank to ``maps`` [M, H, W] (M = cfg.memory_size) and their training-set indices [M]."""
        if maps.shape != self.maps.shape:
            raise ValueError(f"BackgroundMemory.fill: 'maps' must be {list(self.maps.shape)}, got {list(maps.shape)}")
        src = torch.arange(maps.shape[0]) if source_index is None else source_index
        if src.shape != self.source_index.shape:
            raise ValueError(f"BackgroundMemory.fill: 'source_index' must be [{maps.shape[0]}], got {list(src.shape)}")
        with torch.no_grad():
            self.maps.copy_(maps.to(self.maps.dtype))
            self.source_index.copy_(src.to(torch.int64))
        self._bank = None

    def bank(self) -> LayoutMemory:
        """The :class:`LayoutMemory` over ``maps`` (counted once; rebuilt when the buffer changed or moved)."""
        key = (self.maps.data_ptr(), self.maps._version, self.maps.device)
        if self._bank is None or self._bank[0] != key:
            self._bank = (key, LayoutMemory(self.maps, self.cfg.label_nc, self.cfg.ignore_index))
        return self._bank[1]

    def exclude_positions(self, index: torch.Tensor | None, n: int) -> torch.Tensor:
        """Memory positions holding the training items ``index`` [N] (-1 where the bank does not hold one)."""
        if index is None:
            return torch.full((n,), -1, dtype=torch.int64, device=self.maps.device)
        hit = self.source_index[None, :] == index.to(self.source_index.device)[:, None]
        return torch.where(hit.any(dim=1), hit.to(torch.int8).argmax(dim=1), -1)

    @torch.no_grad()
    def retrieve(self, box_mask: torch.Tensor, index: torch.Tensor | None = None, k: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best memory maps for each query.

        Args:
            box_mask: [N, C, H, W] bool box masks (the query).
            index: [N] training-set indices of the queries (their own map is never retrieved), or None.
        Returns:
            (maps [N, k, H, W] int64 class maps, position [N, k] int64 memory positions). A query without any box
            pixel has no foreground to match: it gets the first k positions that are not its own map.
        """
        k = self.cfg.k if k is None else k
        if len(self.maps) == 0:
            raise ValueError("BackgroundMemory.retrieve: the memory bank is empty (fill it from the training split)")
        n = box_mask.shape[0]
        query = box_mask.to(device=self.maps.device, dtype=torch.bool)
        exclude = self.exclude_positions(index, n)
        has_box = query.flatten(1).any(dim=1)
        pos = torch.empty(n, k, dtype=torch.int64, device=self.maps.device)
        if bool(has_box.any()):
            rows = has_box.nonzero().squeeze(1)
            _, idx = layout_retrieval(query[rows], self.bank(), k=k, exclude=exclude[rows],
                                      ignore_index=self.cfg.ignore_index)
            pos[rows] = idx
        for r in (~has_box).nonzero().squeeze(1).tolist():
            first = [i for i in range(k + 1) if i != int(exclude[r])][:k]
            pos[r] = torch.tensor(first, dtype=torch.int64, device=pos.device)
        return self.maps[pos].long(), pos
