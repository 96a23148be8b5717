"""AdvConfig: REFERENCE.md defaults, validation, official VILLA config keys."""

import json
from pathlib import Path

import pytest

from fastvl.adversarial import MODES, AdvConfig
from fastvl.adversarial.config import mode_from_official

OFFICIAL = Path("/work/shared/reference-configs/villa-train-vqa-base-4gpu-adv.json")


def test_defaults_are_reference_md():
    c = AdvConfig()
    assert (c.adv_steps, c.adv_lr_txt, c.adv_lr_img, c.adv_kl_weight, c.norm, c.adv_max_norm, c.adv_init_mag) == \
        (3, 1e-3, 1e-3, 1.5, "l2", 0.0, 0.0)
    assert c.mode == "text"  # the official script's default adv_modality


@pytest.mark.parametrize("mode,passes,modalities,scale", [
    ("text", (("text",),), ("text",), 1 / 3),
    ("image", (("image",),), ("image",), 1 / 3),
    ("both", (("text", "image"),), ("text", "image"), 1 / 3),
    ("alter", (("text",), ("image",)), ("text", "image"), 1 / 6),
])
def test_passes_and_loss_scale(mode, passes, modalities, scale):
    c = AdvConfig(mode=mode, adv_lr_txt=0.1, adv_lr_img=0.2)
    assert c.passes == passes and c.modalities == modalities
    assert c.loss_scale == pytest.approx(scale)
    assert (c.lr("text"), c.lr("image")) == (0.1, 0.2)


def test_from_official_vqa_config():
    opts = json.loads(OFFICIAL.read_text()) if OFFICIAL.exists() else {
        "adv_training": True, "adv_modality": ["text"], "adv_lr_txt": 1e-3, "adv_lr_img": 1e-3, "adv_steps": 3,
        "norm_type": "l2", "adv_max_norm": 0, "adv_kl_weight": 1.5}
    c = AdvConfig.from_official(opts)
    assert c == AdvConfig(mode="text", norm="l2", adv_steps=3, adv_lr_txt=1e-3, adv_lr_img=1e-3, adv_max_norm=0.0,
                          adv_kl_weight=1.5)
    assert isinstance(c.adv_max_norm, float)
    assert AdvConfig.from_official({**opts, "adv_training": False}) is None
    assert AdvConfig.from_official({}) is None


@pytest.mark.skipif(not OFFICIAL.exists(), reason=f"official VILLA config {OFFICIAL} is absent")
def test_official_config_starts_from_a_zero_delta():
    """No official script reads adv_init_mag (their delta is torch.zeros_like): an official config gives a zero init
    even when the key is present; a random init stays available by name."""
    import torch

    from fastvl.adversarial import Perturbation
    from fastvl.batch import PackedVLBatch

    opts = json.loads(OFFICIAL.read_text())
    for extra in ({}, {"adv_init_mag": 0.5}, {"adv_init_mag": 2, "adv_init_dist": "normal"}):
        c = AdvConfig.from_official({**opts, **extra})
        assert c.adv_init_mag == 0.0, extra
        batch = PackedVLBatch(input_ids=torch.ones(5, dtype=torch.long), txt_lens=[2, 3],
                              img_feat=torch.rand(4, 6), img_pos=torch.rand(4, 7), img_lens=[1, 3])
        pert = Perturbation.packed(AdvConfig(**{**c.to_dict(), "mode": "both"}), batch, 8,
                                   generator=torch.Generator().manual_seed(0))
        assert all(d.tensor.abs().sum() == 0 for d in pert.active)
    assert AdvConfig(adv_init_mag=0.5).adv_init_mag == 0.5
    assert AdvConfig.from_dict({"adv_init_mag": 0.5}).adv_init_mag == 0.5


@pytest.mark.parametrize("modality,mode", [
    (["text"], "text"), (["image"], "image"), (["image", "text"], "both"), (["text", "image"], "both"),
    (["alter"], "alter"), (["text", "image", "alter"], "alter"), ("image", "image"),
])
def test_official_modality(modality, mode):
    assert mode_from_official(modality) == mode
    opts = {"adv_training": True, "adv_modality": modality, "adv_lr_img": 0.01, "norm_type": "linf"}
    c = AdvConfig.from_official(opts)
    assert c.mode == mode and c.adv_lr_img == 0.01 and c.norm == "linf"


@pytest.mark.parametrize("mode", MODES)
def test_official_round_trip(mode):
    c = AdvConfig(mode=mode, norm="linf", adv_steps=2, adv_lr_txt=0.01, adv_lr_img=0.02, adv_max_norm=0.5,
                  adv_kl_weight=1.0)
    assert AdvConfig.from_official(c.to_official()) == c
    assert AdvConfig.from_dict(c.to_dict()) == c


def test_from_dict_shorthand_and_unknown_keys():
    assert AdvConfig.from_dict({"adv_lr": 0.05, "mode": "both"}) == AdvConfig(mode="both", adv_lr_txt=0.05,
                                                                               adv_lr_img=0.05)
    with pytest.raises(ValueError, match=r"unknown keys \['adv_lrr'\]"):
        AdvConfig.from_dict({"adv_lrr": 0.05})


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(mode="txt"), r"'mode' must be one of \('text', 'image', 'both', 'alter'\), got 'txt'"),
    (dict(norm="l1"), r"'norm' must be one of \('l2', 'linf'\), got 'l1'"),
    (dict(adv_steps=0), r"'adv_steps' must be an int >= 1, got 0"),
    (dict(adv_steps=2.5), r"'adv_steps' must be an int >= 1, got 2.5"),
    (dict(adv_steps=True), r"'adv_steps' must be an int >= 1, got True"),
    (dict(adv_lr_txt=-1e-3), r"'adv_lr_txt' must be a finite number >= 0, got -0.001"),
    (dict(adv_max_norm=float("inf")), r"'adv_max_norm' must be a finite number >= 0, got inf"),
    (dict(adv_kl_weight=float("nan")), r"'adv_kl_weight' must be a finite number >= 0, got nan"),
    (dict(adv_init_dist="laplace"), r"'adv_init_dist' must be one of \('uniform', 'normal'\)"),
])
def test_bad_values_name_the_field(kwargs, pattern):
    with pytest.raises(ValueError, match=r"fastvl.adversarial.AdvConfig: " + pattern):
        AdvConfig(**kwargs)


def test_bad_official_modality():
    with pytest.raises(ValueError, match=r"'adv_modality' must list 'text', 'image' and/or 'alter', got \['audio'\]"):
        AdvConfig.from_official({"adv_training": True, "adv_modality": ["audio"]})
    with pytest.raises(ValueError, match=r"'modality' must be one of"):
        AdvConfig().lr("video")
