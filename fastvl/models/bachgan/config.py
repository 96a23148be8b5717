"""BachGAN configuration: one dataclass and its named presets (``small`` for CPU minutes, ``official`` sizes)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

__all__ = ["CITYSCAPES_FOREGROUND", "PRESETS", "BachGANConfig", "bachgan_preset"]

#: Cityscapes foreground labelIds (person, rider, car, truck, bus, caravan, trailer, train, motorcycle, bicycle).
CITYSCAPES_FOREGROUND: tuple[int, ...] = tuple(range(24, 34))


@dataclass
class BachGANConfig:
    """Sizes of the BachGAN generator, discriminator and retrieval.

    Attributes:
        label_nc: C, the number of classes (one box-mask channel per class; Cityscapes 35, ADE20K 151).
        foreground: the class ids whose boxes form the layout (every other class is background).
        height, width: image size; both divisible by ``2 ** num_up``.
        ngf: generator width (blocks 16, 16, 16, 16, 8, 4, 2, 1 x ngf as the official SPADE generator).
        num_up: nearest x2 up-samplings from the latent grid (official: 5 ADE20K 'normal', 6 Cityscapes 'more';
            4 starts the middle blocks at the latent grid, fastvl's small preset).
        spade_hidden: channels of SPADE's shared conv (official 128).
        ndf, n_layers_d, num_d: PatchGAN width, layers (kernel 4, strides 2, 2, 2, 1) and scales.
        retrieval: False = the no-retrieval ablation (SPADE on the box map alone; no fusion module).
        k: retrieved maps per query (official 3).
        memory_size: maps in the memory bank (set from the training data; stored with the checkpoint).
        ignore_index: label id of unlabelled pixels (never a class of any channel).
        init_gain: Xavier-normal gain of every conv (official 0.02; the small preset 1.0: spectral-norm convs do
            not feel it, but with 0.02 the image head and SPADE's gamma / beta convs start ~50x too small, and Adam
            at lr 1e-4 needs thousands of steps to grow them, far beyond a CPU-minutes run).
        fusion_init: 'identity' (fastvl's small preset: the two fusion convs start as the identity, so the fused
            map starts as 2 box map + mean of the retrieved maps and SPADE sees the retrieved backgrounds from the
            first step) or 'xavier' (official: like every conv; the fused map then starts ~0.01 in scale).
    """

    label_nc: int = 8
    foreground: tuple[int, ...] = ()
    height: int = 64
    width: int = 64
    ngf: int = 8
    num_up: int = 4
    spade_hidden: int = 16
    ndf: int = 16
    n_layers_d: int = 4
    num_d: int = 2
    retrieval: bool = True
    k: int = 3
    memory_size: int = 0
    ignore_index: int = 255
    init_gain: float = 1.0
    fusion_init: str = "identity"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.foreground = tuple(int(c) for c in self.foreground)
        if self.label_nc < 1:
            raise ValueError(f"BachGANConfig: 'label_nc' must be >= 1, got {self.label_nc}")
        bad = [c for c in self.foreground if not 0 <= c < self.label_nc]
        if bad:
            raise ValueError(f"BachGANConfig: 'foreground' ids {bad} are not classes in [0, {self.label_nc})")
        if self.num_up not in (4, 5, 6):
            raise ValueError(f"BachGANConfig: 'num_up' must be 4, 5 or 6, got {self.num_up}")
        step = 2 ** self.num_up
        if self.height % step or self.width % step or self.height < step or self.width < step:
            raise ValueError(f"BachGANConfig: 'height' x 'width' = {self.height} x {self.width} must be positive "
                             f"multiples of 2 ** num_up = {step}")
        if self.fusion_init not in ("identity", "xavier"):
            raise ValueError(f"BachGANConfig: 'fusion_init' must be 'identity' or 'xavier', got {self.fusion_init!r}")
        if self.k < 1 or self.num_d < 1 or self.n_layers_d < 1:
            raise ValueError(f"BachGANConfig: 'k', 'num_d', 'n_layers_d' must be >= 1, got {self.k}, {self.num_d}, "
                             f"{self.n_layers_d}")

    @property
    def latent_size(self) -> tuple[int, int]:
        """(height, width) of the generator's first feature map."""
        return self.height // 2 ** self.num_up, self.width // 2 ** self.num_up

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples as lists)."""
        d = asdict(self)
        d["foreground"] = list(self.foreground)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BachGANConfig:
        """The config of :meth:`to_dict`; unknown keys are an error naming them."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"BachGANConfig: unknown keys {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _official_cityscapes() -> BachGANConfig:
    return BachGANConfig(label_nc=35, foreground=CITYSCAPES_FOREGROUND, height=256, width=512, ngf=64, num_up=6,
                         spade_hidden=128, ndf=64, fusion_init="xavier", init_gain=0.02)


def _official_ade20k() -> BachGANConfig:
    return BachGANConfig(label_nc=151, foreground=(), height=256, width=256, ngf=64, num_up=5, spade_hidden=128,
                         ndf=64, fusion_init="xavier", init_gain=0.02)


#: Named presets. ``small`` (default): CPU minutes at 64 x 64 (ngf 8, SPADE hidden 16, ndf 16, init gain 1).
#: ``official``: the official sizes (ngf 64, 1024-channel blocks, ndf 64, SPADE hidden 128) at Cityscapes 512 x 256;
#: ``official-ade20k``: the same at ADE20K 256 x 256.
PRESETS = {
    "small": BachGANConfig,
    "official": _official_cityscapes,
    "official-cityscapes": _official_cityscapes,
    "official-ade20k": _official_ade20k,
}


def bachgan_preset(name: str, **overrides: Any) -> BachGANConfig:
    """The preset ``name`` (see :data:`PRESETS`) with ``overrides`` applied (e.g. ``label_nc``, ``foreground``)."""
    if name not in PRESETS:
        raise ValueError(f"bachgan_preset: unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return replace(PRESETS[name](), **overrides)
