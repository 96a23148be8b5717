"""VIOLIN baseline: official keys, the forward against a per-example hand-written LSTM / BiDAF / head, the loss, the
text encoder against transformers' BertModel (weights loaded from a state_dict file), and argument errors."""

import pytest
import torch
from torch.nn import functional as F

from fastvl.models.violin import (
    TextEncoderConfig,
    ViolinBase,
    ViolinConfig,
    ViolinTextEncoder,
    load_bert_state_dict,
    violin_loss,
    violin_loss_from_probs,
)

OFFICIAL_PREFIXES = {"lstm_raw.rnn", "lstm_mature_vid.rnn", "bert_fc.1", "video_fc.1", "vid_ctx_rnn.rnn",
                     "sub_ctx_rnn.rnn", "final_fc.0", "final_fc.3"}
LSTM_KEYS = {f"{w}_{p}_l0{s}" for w in ("weight", "bias") for p in ("ih", "hh") for s in ("", "_reverse")}


def test_official_keys_and_shapes():
    m = ViolinBase(ViolinConfig())  # paper sizes: feat 2048, BERT 768, hsize 150 / 300
    sd = m.state_dict()
    expected = {f"{p}.{k}" for p in OFFICIAL_PREFIXES if p.endswith("rnn") for k in LSTM_KEYS}
    expected |= {f"{p}.{k}" for p in OFFICIAL_PREFIXES if not p.endswith("rnn") for k in ("weight", "bias")}
    assert set(sd) == expected
    assert sd["video_fc.1.weight"].shape == (768, 2048)
    assert sd["bert_fc.1.weight"].shape == (300, 768)
    assert sd["lstm_raw.rnn.weight_ih_l0"].shape == (600, 768)
    assert sd["lstm_mature_vid.rnn.weight_ih_l0"].shape == (1200, 1500)
    assert sd["final_fc.0.weight"].shape == (300, 600)
    assert sd["final_fc.3.weight"].shape == (1, 300)


def _lstm_dir(x, rnn, suffix):
    """Hand-written LSTM over x [T, D] (one direction): outputs [T, H], last hidden [H]."""
    w_ih, w_hh = getattr(rnn, f"weight_ih_l0{suffix}"), getattr(rnn, f"weight_hh_l0{suffix}")
    b = getattr(rnn, f"bias_ih_l0{suffix}") + getattr(rnn, f"bias_hh_l0{suffix}")
    hdim = w_hh.shape[1]
    h, c, outs = x.new_zeros(hdim), x.new_zeros(hdim), []
    for t in range(x.shape[0]):
        g = w_ih @ x[t] + w_hh @ h + b
        i, f, gg, o = torch.sigmoid(g[:hdim]), torch.sigmoid(g[hdim:2 * hdim]), torch.tanh(g[2 * hdim:3 * hdim]), \
            torch.sigmoid(g[3 * hdim:])
        c = f * c + i * gg
        h = o * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs), h


def _bilstm(x, enc):
    fw, hf = _lstm_dir(x, enc.rnn, "")
    bw, hb = _lstm_dir(x.flip(0), enc.rnn, "_reverse")
    return torch.cat([fw, bw.flip(0)], -1), torch.cat([hf, hb])


def _attend(s, ctx):
    return torch.softmax(s @ ctx.t(), dim=1) @ ctx


def _hand_forward(m, vid, vl, sub, sl, st, ql):
    """One example at a time, no padding anywhere: the baseline as the paper writes it (eval mode)."""
    out = []
    for b in range(vid.shape[0]):
        v = F.normalize(vid[b, :vl[b]], dim=-1)
        v_enc, _ = _bilstm(torch.tanh(v @ m.video_fc[1].weight.t() + m.video_fc[1].bias), m.lstm_raw)
        proj = lambda x: torch.tanh(x @ m.bert_fc[1].weight.t() + m.bert_fc[1].bias)  # noqa: E731
        s = proj(st[b, :ql[b]])
        u_v, u_s = _attend(s, v_enc), _attend(s, proj(sub[b, :sl[b]]))
        _, last = _bilstm(torch.cat([s, u_v, u_s, s * u_v, s * u_s], -1), m.lstm_mature_vid)
        hid = torch.relu(m.final_fc[0](last))
        out.append(torch.sigmoid(m.final_fc[3](hid)))
    return torch.stack(out)


@pytest.mark.parametrize("rep", range(3))
def test_forward_matches_hand_formula(seed, rep):
    cfg = ViolinConfig(vid_feat_size=11, embed_size=9, hsize1=5, hsize2=7)
    m = ViolinBase(cfg).double().eval()
    b = 4
    vl, sl, ql = [1, 7, 3, 5], [6, 1, 4, 2], [3, 5, 1, 4]
    vid = torch.randn(b, 7, 11, dtype=torch.double)
    sub = torch.randn(b, 6, 9, dtype=torch.double)
    st = torch.randn(b, 5, 9, dtype=torch.double)
    got = m((vid, torch.tensor(vl)), (sub, torch.tensor(sl)), (st, torch.tensor(ql)))
    want = _hand_forward(m, vid, vl, sub, sl, st, ql)
    assert got.shape == (b, 1)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    # padding content is never read
    vid2, sub2, st2 = vid.clone(), sub.clone(), st.clone()
    vid2[0, 1:] = 1e3
    sub2[1, 1:] = -1e3
    st2[2, 1:] = 7.0
    again = m((vid2, torch.tensor(vl)), (sub2, torch.tensor(sl)), (st2, torch.tensor(ql)))
    torch.testing.assert_close(again, got, rtol=1e-9, atol=1e-10)
    logits = m((vid, vl), (sub, sl), (st, ql), return_logits=True)
    torch.testing.assert_close(torch.sigmoid(logits), got)


def test_single_stream_uses_its_ctx_rnn(seed):
    cfg = ViolinConfig(vid_feat_size=6, embed_size=4, hsize1=3, hsize2=5, input_streams=("sub",))
    m = ViolinBase(cfg).double().eval()
    sub, st = torch.randn(2, 4, 4, dtype=torch.double), torch.randn(2, 3, 4, dtype=torch.double)
    got = m(None, (sub, [4, 2]), (st, [3, 2]))
    for b, (sl, ql) in enumerate([(4, 3), (2, 2)]):
        proj = lambda x: torch.tanh(x @ m.bert_fc[1].weight.t() + m.bert_fc[1].bias)  # noqa: E731
        s = proj(st[b, :ql])
        u = _attend(s, proj(sub[b, :sl]))
        _, last = _bilstm(torch.cat([s, u, s * u], -1), m.sub_ctx_rnn)
        want = torch.sigmoid(m.final_fc[3](torch.relu(m.final_fc[0](last))))
        torch.testing.assert_close(got[b], want)


def test_loss_hand_formula(seed):
    zp, zn = torch.randn(9, dtype=torch.double) * 3, torch.randn(9, dtype=torch.double) * 3
    p_pos, p_neg = 1 / (1 + torch.exp(-zp)), 1 / (1 + torch.exp(-zn))
    want = sum(-torch.log(1 - p_neg[i]) - torch.log(p_pos[i]) for i in range(9)) / 9
    torch.testing.assert_close(violin_loss(zp, zn).double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(violin_loss_from_probs(p_pos, p_neg), want)


def test_text_encoder_matches_transformers_bert(seed, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = TextEncoderConfig(vocab_size=37, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=24, max_position_embeddings=20)
    hf = transformers.BertModel(transformers.BertConfig(**{k: v for k, v in cfg.to_dict().items()
                                                           if k != "layer_norm_eps"})).eval()
    sd = {f"bert.{k}": v for k, v in hf.state_dict().items()}  # as saved by BertForPreTraining
    sd["cls.predictions.bias"] = torch.zeros(37)
    torch.save(sd, tmp_path / "bert.bin")
    enc = ViolinTextEncoder(cfg).eval()
    ignored = load_bert_state_dict(enc, tmp_path / "bert.bin")
    assert "cls.predictions.bias" in ignored and not any("encoder.layer" in k for k in ignored)
    lens = [5, 1, 7]
    ids = torch.randint(1, 37, (3, 7))
    mask = (torch.arange(7)[None] < torch.tensor(lens)[:, None]).long()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = enc(ids, lens)
    for i, n in enumerate(lens):
        torch.testing.assert_close(got[i, :n], want[i, :n], rtol=1e-4, atol=1e-5)
        assert got[i, n:].abs().sum() == 0


def test_errors(tmp_path):
    m = ViolinBase(ViolinConfig(vid_feat_size=6, embed_size=4, hsize1=3, hsize2=5))
    st = (torch.randn(2, 3, 4), [3, 2])
    sub = (torch.randn(2, 4, 4), [4, 2])
    with pytest.raises(ValueError, match=r"vid_input\[0\].*\[B, T, 6\]"):
        m((torch.randn(2, 5, 7), [5, 5]), sub, st)
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 5\]"):
        m((torch.randn(2, 5, 6), [6, 5]), sub, st)
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 4\]"):
        m((torch.randn(2, 5, 6), [5, 5]), (torch.randn(2, 4, 4), [0, 2]), st)
    with pytest.raises(ValueError, match="input_streams"):
        ViolinConfig(input_streams=("audio",))
    enc = ViolinTextEncoder(TextEncoderConfig(vocab_size=11, hidden_size=8, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=8))
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        load_bert_state_dict(enc, tmp_path / "nope.bin")
    torch.save({"embeddings.word_embeddings.weight": torch.zeros(11, 8)}, tmp_path / "part.bin")
    with pytest.raises(ValueError, match=r"part.bin lacks .* encoder weight"):
        load_bert_state_dict(enc, tmp_path / "part.bin")
