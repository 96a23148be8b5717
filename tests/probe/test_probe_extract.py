"""fastvl.probe.attention_maps / hidden_states against a plain padded implementation written out here."""

import math

import pytest
import torch

from fastvl.models.uniter import UniterForPretraining, UniterModel
from fastvl.models.uniter.testing import random_pretrain_batch, tiny_config, to_official_batch
from fastvl.probe import attention_maps, hidden_states, probe_forward, read_maps, write_maps


def plain_padded(model: UniterModel, b: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every layer's attention probabilities [B, heads, L, L] and outputs [B, L, H], the plain padded way:
    separate text / image embeddings, torch.gather by gather_index, additive (1 - mask) * -10000 mask."""
    e, ie = model.embeddings, model.img_embeddings
    ids, pos = b["input_ids"], b["position_ids"]
    txt = e.LayerNorm(e.word_embeddings(ids) + e.position_embeddings(pos) + e.token_type_embeddings.weight[0])
    img = ie.LayerNorm(ie.img_layer_norm(ie.img_linear(b["img_feat"])) + ie.pos_layer_norm(ie.pos_linear(
        b["img_pos_feat"])) + e.token_type_embeddings.weight[1])
    hid = model.config.hidden_size
    x = torch.gather(torch.cat([txt, img], 1), 1, b["gather_index"].unsqueeze(-1).expand(-1, -1, hid))
    ext = (1.0 - b["attn_masks"][:, None, None, :].float()) * -10000.0
    n_heads = model.config.num_attention_heads
    d = hid // n_heads
    probs, outs = [], [x]
    for layer in model.encoder.layer:
        sa = layer.attention.self
        bsz, length, _ = x.shape
        q, k, v = (lin(x).view(bsz, length, n_heads, d).transpose(1, 2) for lin in (sa.query, sa.key, sa.value))
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + ext, dim=-1)
        probs.append(p)
        ctx = (p @ v).transpose(1, 2).reshape(bsz, length, hid)
        a = layer.attention.output.LayerNorm(layer.attention.output.dense(ctx) + x)
        inter = torch.nn.functional.gelu(layer.intermediate.dense(a))
        x = layer.output.LayerNorm(layer.output.dense(inter) + a)
        outs.append(x)
    return probs, outs


@pytest.mark.parametrize("heads,layers", [(4, 2), (3, 3)])
def test_attention_maps_equal_plain_padded(gen, heads, layers):
    cfg = tiny_config(num_attention_heads=heads, hidden_size=heads * 7, num_hidden_layers=layers)
    model = UniterForPretraining(cfg, cfg.img_dim, cfg.img_label_dim).double()
    packed = random_pretrain_batch("none", gen, cfg, batch=7, txt_range=(1, 13), img_range=(1, 9),
                                   dtype=torch.float64)
    b = to_official_batch(packed, "itm")
    b["extra_key"] = "ignored"
    model.train()  # left in training mode: the probe must not change it
    model.uniter.encoder.layer[0].eval()  # a mixed state is restored module by module
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    att = attention_maps(model, b)
    hid = hidden_states(model, b)
    with torch.no_grad():
        ref_p, ref_h = plain_padded(model.uniter, b)
    mask = b["attn_masks"].bool()
    width = mask.shape[1]
    assert att.shape == (layers, 7, heads, width, width)
    assert hid.shape == (layers + 1, 7, width, cfg.hidden_size)
    valid = (mask[:, None, :, None] & mask[:, None, None, :])  # [B, 1, L, L]
    for n in range(layers):
        torch.testing.assert_close(att[n].masked_fill(~valid, 0), ref_p[n].masked_fill(~valid, 0), rtol=1e-9,
                                   atol=1e-12)
        assert torch.all(att[n].masked_fill(valid, 0) == 0)  # 0 at padding rows and columns
    rows = att.sum(-1)  # [layers, B, heads, L]
    torch.testing.assert_close(rows, mask[None, :, None, :].expand_as(rows).double(), rtol=0, atol=1e-12)
    for n in range(layers + 1):
        torch.testing.assert_close(hid[n][mask], ref_h[n][mask], rtol=1e-9, atol=1e-10)
        assert torch.all(hid[n][~mask] == 0)
    # the model is left as it was
    assert model.training and not model.uniter.encoder.layer[0].training and model.uniter.encoder.layer[1].training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == n_hooks


def test_probe_forward_rejects_bad_inputs(gen):
    cfg = tiny_config()
    model = UniterModel(cfg, cfg.img_dim)
    b = to_official_batch(random_pretrain_batch("none", gen, cfg, batch=3), "itm")
    with pytest.raises(ValueError, match="lacks \\['gather_index'\\]"):
        attention_maps(model, {k: v for k, v in b.items() if k != "gather_index"})
    with pytest.raises(TypeError, match="UniterModel"):
        attention_maps(torch.nn.Linear(2, 2), b)
    bad = dict(b, img_feat=b["img_feat"][..., :5], img_pos_feat=b["img_pos_feat"])
    with pytest.raises(ValueError, match="img_dim"):
        attention_maps(model, bad)


def test_write_maps_streams_examples(tmp_path, gen):
    cfg = tiny_config()
    model = UniterModel(cfg, cfg.img_dim)
    batches = [to_official_batch(random_pretrain_batch("none", gen, cfg, batch=n), "itm") for n in (2, 3)]
    write_maps(model, batches, tmp_path / "maps", dtype=torch.float32)
    items = list(read_maps(tmp_path / "maps"))
    assert len(items) == 5
    out = probe_forward(model, batches[1])
    for i, item in enumerate(items[2:]):
        s = out.txt_lens[i] + out.img_lens[i]
        assert (item["txt_len"], item["img_len"]) == (out.txt_lens[i], out.img_lens[i])
        torch.testing.assert_close(item["attentions"], out.attentions[:, i, :, :s, :s])
        torch.testing.assert_close(item["hidden_states"], out.hidden_states[:, i, :s])
