"""BachGAN modules: shapes for both presets, the fusion formula, the pasting rules, SPADE, retrieval, official keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastvl.models.bachgan import (
    SPADE,
    BachGAN,
    BackgroundFusion,
    BackgroundMemory,
    MultiscaleDiscriminator,
    SPADEGenerator,
    SPADEResnetBlock,
    bachgan_preset,
    paste_boxes,
)
from fastvl.ops.layout_ret import layout_retrieval_reference


@pytest.fixture(autouse=True)
def _plain_spade_norm(monkeypatch):
    # model tests check the model's wiring; spade_norm's backends are checked against its reference in tests/ops
    # (under TRITON_INTERPRET=1 the interpreter would otherwise serve every CPU call)
    monkeypatch.setenv("FASTVL_BACKEND", "spade_norm=reference")


def _tiny(**kw):
    base = dict(label_nc=5, foreground=(3, 4), height=16, width=32, ngf=2, spade_hidden=4, ndf=4, memory_size=9)
    base.update(kw)
    return bachgan_preset("small", **base)


def _boxes(n, c, h, w, fg, gen):
    mask = torch.zeros(n, c, h, w, dtype=torch.bool)
    for i in range(n):
        for _ in range(2):
            cls = fg[int(torch.randint(len(fg), (1,), generator=gen))]
            y0, x0 = int(torch.randint(h - 3, (1,), generator=gen)), int(torch.randint(w - 3, (1,), generator=gen))
            mask[i, cls, y0:y0 + 3, x0:x0 + 5] = True
    return mask


def test_small_preset_shapes(seed, gen):
    cfg = _tiny()
    model = BachGAN(cfg)
    maps = torch.randint(0, 5, (9, 16, 32), generator=gen).to(torch.uint8)
    maps[0, :2, :2] = 255
    model.memory.fill(maps)
    n = 3
    box_mask = _boxes(n, 5, 16, 32, cfg.foreground, gen)
    inp = model.generator_input(box_mask, torch.tensor([0, 1, 2]))
    assert inp.box_map.shape == (n, 5, 16, 32)
    assert inp.retrieved.shape == (n, cfg.k, 5, 16, 32)
    assert inp.retrieved_maps.shape == (n, cfg.k, 16, 32)
    image, seg = model.generate(inp)
    assert image.shape == (n, 3, 16, 32) and seg.shape == (n, 5, 16, 32)
    assert image.abs().max() <= 1
    torch.testing.assert_close(seg.exp().sum(1), torch.ones(n, 16, 32))
    fake, real = model.discriminate(inp.box_map, image, image.detach() * 0.5)
    assert len(fake) == cfg.num_d == 2 and len(fake[0]) == cfg.n_layers_d + 1
    assert [t.shape[1] for t in fake[0]] == [4, 8, 16, 32, 1]
    assert fake[1][0].shape[-2:] == (5, 9)  # the second scale sees the 3x3 / 2 pooled input
    assert all(a.shape == b.shape for a, b in zip(fake[0], real[0], strict=True))


def test_ablation_has_no_retrieval(seed, gen):
    cfg = _tiny(retrieval=False, memory_size=0)
    model = BachGAN(cfg)
    assert not hasattr(model, "memory")
    assert not any("encode_shared" in k for k in model.state_dict())
    inp = model.generator_input(_boxes(2, 5, 16, 32, cfg.foreground, gen))
    assert inp.retrieved is None
    image, _ = model.generate(inp)
    assert image.shape == (2, 3, 16, 32)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["official", "official-ade20k"])
def test_official_presets_construct(name):
    cfg = bachgan_preset(name, memory_size=0)
    gen = SPADEGenerator(cfg)
    disc = MultiscaleDiscriminator(cfg)
    assert gen.head_0.conv_0.weight_orig.shape[:2] == (1024, 1024)
    assert [getattr(gen, f"up_{i}").conv_1.weight_orig.shape[0] for i in range(4)] == [512, 256, 128, 64]
    assert gen.head_0.norm_0.mlp_shared[0].weight.shape == (128, cfg.label_nc, 3, 3)
    assert gen.conv_img.weight.shape == (3, 64, 3, 3) and gen.conv_seg.weight.shape == (cfg.label_nc, 64, 3, 3)
    assert disc.discriminator_0.model0[0].weight.shape == (64, cfg.label_nc + 3, 4, 4)
    assert disc.discriminator_0.model3[0][0].weight_orig.shape[0] == 512
    n_g = sum(p.numel() for p in gen.parameters())
    n_d = sum(p.numel() for p in disc.parameters())
    assert 90e6 < n_g < 100e6, n_g  # SPADE's Cityscapes / ADE20K generator is about 93-97 M parameters
    assert 5e6 < n_d < 6e6, n_d
    if name == "official":
        assert (cfg.height, cfg.width, cfg.num_up, cfg.latent_size) == (256, 512, 6, (4, 8))
    else:
        assert (cfg.height, cfg.width, cfg.num_up, cfg.latent_size) == (256, 256, 5, (8, 8))


def test_official_state_dict_names():
    keys = set(BachGAN(_tiny()).state_dict())
    for k in ["generator.encode_shared.0.weight", "generator.memory_shared.0.weight", "generator.fc.weight",
              "generator.head_0.conv_0.weight_orig", "generator.head_0.conv_0.weight_u",
              "generator.up_0.conv_s.weight_orig", "generator.up_0.norm_s.mlp_shared.0.weight",
              "generator.G_middle_1.norm_1.mlp_gamma.weight", "generator.up_3.norm_0.param_free_norm.running_var",
              "generator.conv_seg.weight", "discriminator.discriminator_1.model1.0.0.weight_orig",
              "discriminator.discriminator_0.model4.0.weight", "memory.maps", "memory.foreground"]:
        assert k in keys, k
    assert "generator.up_0.conv_s.bias" not in keys  # the learned shortcut has no bias


def test_fusion_matches_hand_formula(seed, gen):
    c, k, n, h, w = 4, 3, 2, 5, 7
    fusion = BackgroundFusion(c)
    for p in fusion.parameters():
        p.data.normal_(0, 0.5, generator=gen)
    box = torch.rand(n, c, h, w, generator=gen)
    ret = torch.rand(n, k, c, h, w, generator=gen)
    w1, b1 = fusion.encode_shared[0].weight, fusion.encode_shared[0].bias
    w2, b2 = fusion.memory_shared[0].weight, fusion.memory_shared[0].bias

    def enc(x):
        return torch.relu(F.conv2d(x, w1, b1, padding=1))

    e_box = enc(box)
    m0 = e_box + sum(enc(ret[:, i]) for i in range(k)) / k
    expected = torch.relu(F.conv2d(m0, w2, b2, padding=1)) + e_box
    torch.testing.assert_close(fusion(box, ret), expected)


def test_identity_fusion_init(seed, gen):
    model = BachGAN(_tiny())
    box = (torch.rand(2, 5, 16, 32, generator=gen) > 0.7).float()
    ret = (torch.rand(2, 3, 5, 16, 32, generator=gen) > 0.5).float()
    torch.testing.assert_close(model.generator.layout(box, ret), 2 * box + ret.mean(1))
    official = bachgan_preset("official")
    assert official.fusion_init == "xavier"


def test_paste_rules_hand_example():
    # C = 4 classes, foreground {2, 3}; one query with a class-2 box and an overlapping class-3 box.
    maps = torch.tensor([[[[0, 0, 1, 1],
                           [0, 2, 1, 255],
                           [3, 3, 1, 1]]]])  # [N=1, k=1, H=3, W=4]
    box = torch.zeros(1, 4, 3, 4, dtype=torch.bool)
    box[0, 2, 0:2, 0:2] = True
    box[0, 3, 1:2, 1:3] = True
    fg = torch.tensor([False, False, True, True])
    out = paste_boxes(maps, box, fg)
    assert out.shape == (1, 1, 4, 3, 4)
    union = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    expected = torch.zeros(4, 3, 4)
    for y in range(3):
        for x in range(4):
            v = int(maps[0, 0, y, x])
            if not union[y, x] and v != 255 and v < 2:  # background channels survive outside the boxes
                expected[v, y, x] = 1
    expected[2] = box[0, 2].float()  # foreground channels: the query's boxes, the map's own objects removed
    expected[3] = box[0, 3].float()
    torch.testing.assert_close(out[0, 0], expected)
    # the retrieved map's class-3 pixels (row 2) and the ignore pixel are gone; inside the union only boxes remain
    assert out[0, 0, :, 2, 0:2].sum() == 0 and out[0, 0, :, 1, 3].sum() == 0
    assert out[0, 0, :2, union].sum() == 0


def test_spade_matches_formula(seed, gen):
    spade = SPADE(6, 3, hidden=5)
    x = torch.randn(2, 6, 4, 5, generator=gen)
    seg = torch.rand(2, 3, 8, 10, generator=gen)
    out = spade(x, seg)
    s = F.interpolate(seg, size=(4, 5), mode="nearest")
    a = spade.mlp_shared(s)
    mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * (1 + spade.mlp_gamma(a)) + spade.mlp_beta(a)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert int(spade.param_free_norm.num_batches_tracked) == 1
    torch.testing.assert_close(spade.param_free_norm.running_mean, 0.1 * mean.flatten())
    spade.eval()  # running statistics normalise in eval
    rm, rv = spade.param_free_norm.running_mean, spade.param_free_norm.running_var
    expected_eval = ((x - rm[None, :, None, None]) / torch.sqrt(rv[None, :, None, None] + 1e-5)
                     * (1 + spade.mlp_gamma(a)) + spade.mlp_beta(a))
    torch.testing.assert_close(spade(x, seg), expected_eval, rtol=1e-5, atol=1e-5)


def test_resblock_learned_shortcut(seed, gen):
    blk = SPADEResnetBlock(6, 3, label_nc=2, hidden=4)
    assert blk.learned_shortcut and blk.conv_s.weight_orig.shape == (3, 6, 1, 1)
    same = SPADEResnetBlock(3, 3, label_nc=2, hidden=4)
    assert not same.learned_shortcut and not hasattr(same, "conv_s")
    out = blk(torch.randn(2, 6, 5, 7, generator=gen), torch.rand(2, 2, 5, 7, generator=gen))
    assert out.shape == (2, 3, 5, 7)


def test_retrieval_matches_reference_and_excludes_self(seed, gen):
    cfg = _tiny(memory_size=11)
    mem = BackgroundMemory(cfg)
    maps = torch.randint(0, 5, (11, 16, 32), generator=gen).to(torch.uint8)
    src = torch.arange(100, 111)
    mem.fill(maps, src)
    box = _boxes(4, 5, 16, 32, cfg.foreground, gen)
    box[0] = maps[5].long() == 3  # query 0's boxes are exactly memory map 5's class-3 pixels
    box[0, 4] = maps[5] == 4
    got, pos = mem.retrieve(box, torch.tensor([105, 101, 999, 103]))
    _, ref = layout_retrieval_reference(box, maps, k=3, exclude=torch.tensor([5, 1, -1, 3]))
    assert torch.equal(pos, ref)
    assert torch.equal(got, maps[ref].long())
    assert 5 not in pos[0].tolist()
    _, pos_test = mem.retrieve(box[:1])  # without exclusion map 5 matches perfectly
    assert int(pos_test[0, 0]) == 5


def test_retrieval_query_without_boxes(seed, gen):
    cfg = _tiny(memory_size=6)
    mem = BackgroundMemory(cfg)
    mem.fill(torch.randint(0, 5, (6, 16, 32), generator=gen).to(torch.uint8))
    box = _boxes(2, 5, 16, 32, cfg.foreground, gen)
    box[1] = False
    _, pos = mem.retrieve(box, torch.tensor([0, 1]))
    assert pos[1].tolist() == [0, 2, 3]  # no foreground to match: the first k maps other than its own


def test_bad_inputs_named():
    model = BachGAN(_tiny())
    with pytest.raises(ValueError, match="box_mask"):
        model.generator_input(torch.zeros(1, 4, 16, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="maps"):
        model.memory.fill(torch.zeros(3, 16, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="foreground"):
        bachgan_preset("small", label_nc=3, foreground=(5,))
    with pytest.raises(ValueError, match="2 \\*\\* num_up"):
        bachgan_preset("small", height=20)
