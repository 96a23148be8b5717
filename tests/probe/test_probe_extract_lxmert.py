"""LXMERT probe maps: equal to the model's own outputs (the port's fields) and, for the maps the port does not return
(vision -> language cross attention, the cross layers' self-attention), to a plain padded computation."""

import math

import torch

from fastvl.models.lxmert import LxmertConfig, LxmertForPreTraining
from fastvl.probe.extract_lxmert import lxmert_probe_forward


def _cfg():
    return LxmertConfig(vocab_size=50, hidden_size=24, num_attention_heads=3, intermediate_size=40, l_layers=2,
                        x_layers=2, r_layers=1, visual_feat_dim=10, visual_pos_dim=4, num_qa_labels=3,
                        num_object_labels=5, num_attr_labels=4, hidden_dropout_prob=0.1,
                        attention_probs_dropout_prob=0.1)


def _batch(gen, b=5):
    tl = torch.randint(1, 9, (b,), generator=gen).tolist()
    nl = torch.randint(1, 6, (b,), generator=gen).tolist()
    width, n = max(tl), max(nl)
    am = (torch.arange(width)[None] < torch.tensor(tl)[:, None]).long()
    vam = (torch.arange(n)[None] < torch.tensor(nl)[:, None]).long()
    ids = torch.randint(1, 50, (b, width), generator=gen) * am
    return {"input_ids": ids, "attention_mask": am, "visual_attention_mask": vam,
            "visual_feats": torch.randn(b, n, 10, generator=gen, dtype=torch.float64),
            "visual_pos": torch.rand(b, n, 4, generator=gen, dtype=torch.float64), "ids": ["ignored"]}


def _plain_probs(att, x_q, x_k, mask_k):
    """Padded multi-head attention probabilities of x_q [B, Lq, H] over x_k [B, Lk, H] with key mask [B, Lk]."""
    b, lq, h = x_q.shape
    heads = att.num_attention_heads
    d = h // heads
    q = att.query(x_q).view(b, lq, heads, d).transpose(1, 2)
    k = att.key(x_k).view(b, x_k.shape[1], heads, d).transpose(1, 2)
    s = q @ k.transpose(-1, -2) / math.sqrt(d) + (1.0 - mask_k[:, None, None, :].double()) * -10000.0
    return torch.softmax(s, -1)


def test_lxmert_maps_equal_model_outputs(gen):
    model = LxmertForPreTraining(_cfg()).double().train()
    b = _batch(gen)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = lxmert_probe_forward(model, b)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.eval()
    with torch.no_grad():
        ref = model.lxmert(input_ids=b["input_ids"], visual_feats=b["visual_feats"], visual_pos=b["visual_pos"],
                           attention_mask=b["attention_mask"], visual_attention_mask=b["visual_attention_mask"],
                           output_attentions=True, output_hidden_states=True)
    am, vam = b["attention_mask"].bool(), b["visual_attention_mask"].bool()
    for mine, theirs, qm, km in ((out.language, ref.language_attentions, am, am),
                                 (out.vision, ref.vision_attentions, vam, vam),
                                 (out.cross_l2v, ref.cross_encoder_attentions, am, vam)):
        assert mine.shape[0] == len(theirs)
        valid = qm[:, None, :, None] & km[:, None, None, :]
        for m, t in zip(mine, theirs):
            torch.testing.assert_close(m.masked_fill(~valid, 0), t.masked_fill(~valid, 0), rtol=1e-9, atol=1e-12)
            assert torch.all(m.masked_fill(valid, 0) == 0)
    # hidden states: index 0 is the embedding output, then the port's per-layer states
    for mine, theirs, m in ((out.language_hidden[1:], ref.language_hidden_states, am),
                            (out.vision_hidden[1:], ref.vision_hidden_states, vam)):
        for x, y in zip(mine, theirs):
            torch.testing.assert_close(x[m], y[m], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.language_hidden[-1][am], ref.language_output[am], rtol=1e-9, atol=1e-10)
    # the maps the port does not return, the plain padded way from the layer inputs
    lang_in = out.language_hidden[model.config.l_layers]
    visn_in = out.vision_hidden[model.config.r_layers]
    x0 = model.lxmert.encoder.x_layers[0]
    with torch.no_grad():
        p_vl = _plain_probs(x0.visual_attention.att, visn_in, lang_in, am.long())
    valid = vam[:, None, :, None] & am[:, None, None, :]
    torch.testing.assert_close(out.cross_v2l[0].masked_fill(~valid, 0), p_vl.masked_fill(~valid, 0), rtol=1e-9,
                               atol=1e-12)
    for maps, qm in ((out.x_language, am), (out.x_vision, vam), (out.cross_v2l, vam)):
        rows = maps.sum(-1)  # [x, B, heads, Lq]
        torch.testing.assert_close(rows, qm[None, :, None, :].expand_as(rows).double(), rtol=0, atol=1e-12)
