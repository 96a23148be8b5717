"""``fastvl probe``: a run folder in, probes.json / probes.csv / plots out; wrong checkpoints -> one-line errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from cli_run import run_cli

from fastvl.data import synthetic_corpus
from fastvl.models.uniter import UniterForPretraining, UniterModel
from fastvl.models.uniter.testing import tiny_config
from fastvl.probe import attention_maps, official_batch, read_maps, synthetic_examples
from fastvl.probe.suite import STATED_FEATURES
from fastvl.train import checkpoint as ckpt


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    corpus = synthetic_corpus()
    cfg = tiny_config(vocab_size=corpus.vocab_size, img_dim=corpus.img_dim, img_label_dim=corpus.img_label_dim,
                      hidden_size=24, num_attention_heads=3)
    torch.manual_seed(1)
    model = UniterForPretraining(cfg, cfg.img_dim, cfg.img_label_dim)
    run = tmp_path_factory.mktemp("probe") / "run"
    run.mkdir()
    cfg.to_json_file(run / "model_config.json")
    ckpt.save_checkpoint(run, 5, model, {"step": 5})
    return run, model, cfg


@pytest.mark.slow
def test_probe_cli_writes_every_figure(run_folder, tmp_path, capsys):
    run, model, cfg = run_folder
    out = tmp_path / "out"
    code, stdout, err = run_cli(["probe", "--checkpoint", str(run), "--out", str(out), "--examples", "40",
                                 "--folds", "2", "--no-progress", "--controls", "2"], capsys)
    assert code == 0, err
    assert len(doc_controls := json.loads((out / "probes.json").read_text())["controls"]) == 2
    head = json.loads((out / "probes.json").read_text())["headline"]["coreference_accuracy"]
    accs = [c["coreference"]["accuracy"] for c in doc_controls]
    assert head["controls"] == 2 and head["control"] == pytest.approx(np.mean(accs))
    assert head["control_std"] == pytest.approx(np.std(accs))
    assert "coreference_accuracy" in stdout and "nmi_per_layer.png" in stdout
    doc = json.loads((out / "probes.json").read_text())
    fill = doc["headline"]["relation_stated_fill_accuracy"]
    assert fill["control"] is None and 0 <= fill["trained"] <= 1 and 0 < fill["chance"] <= 1
    layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    for who in ("trained", "control"):
        f = doc[who]
        assert f["examples"] == 40 and (f["layers"], f["heads"]) == (layers, heads)
        assert len(f["fusion_nmi"]) == layers + 1 and all(0 <= x <= 1 for x in f["fusion_nmi"])
        np.testing.assert_allclose(np.add(f["cls_text_mass"], f["cls_image_mass"]), 1.0, rtol=1e-5)
        fill = {"stated_fill"} if who == "trained" else set()  # the MLM head's figure; controls are bare encoders
        assert set(f["relations"]) == {"predicate", "bigger than", "same colour as", *STATED_FEATURES, *fill}
        assert set(f["linguistic"]) == {"length", "objects", "opening", "relation_clause"}
        assert all(len(v) == layers + 1 for v in f["linguistic"].values())
    # the [CLS] text mass of the report = the mean over the same captions of attention_maps' [CLS] rows
    exs = list(synthetic_examples(synthetic_corpus(), "val", 40))
    mass = []
    for k in range(0, 40, 16):
        chunk = exs[k:k + 16]
        att = attention_maps(model, official_batch(chunk))
        mass += [att[:, i, :, 0, :e.txt_len].sum(-1) for i, e in enumerate(chunk)]
    np.testing.assert_allclose(doc["trained"]["cls_text_mass"], torch.stack(mass).mean(0).numpy(), rtol=1e-4)
    with open(out / "probes.csv") as f:
        rows = list(csv.DictReader(f))
    assert sum(r["probe"] == "fusion" for r in rows) == layers + 1
    assert sum(r["measure"] == "cls_text_mass" for r in rows) == layers * heads
    assert sum(r["probe"] == "linguistic" for r in rows) == 4 * (layers + 1)
    assert {r["measure"] for r in rows if r["probe"] == "coreference"} == {"accuracy"}
    for name in ("nmi_per_layer", "modality_importance", "cross_modal_heads", "attention_regions"):
        assert (out / f"{name}.png").stat().st_size > 1000
    assert doc["plots"] == [str(out / f"{n}.png") for n in ("nmi_per_layer", "modality_importance",
                                                             "cross_modal_heads", "attention_regions")]


def test_probe_cli_wrong_checkpoints(run_folder, tmp_path, capsys):
    run, model, cfg = run_folder
    lx = tmp_path / "lxmert.pt"
    torch.save({"lxmert.encoder.x_layers.0.visual_attention.att.query.weight": torch.zeros(2, 2)}, lx)
    hero = tmp_path / "hero.pt"
    torch.save({"v_encoder.f_encoder.img_embeddings.img_linear.weight": torch.zeros(2, 2)}, hero)
    pickled = tmp_path / "obj.pt"
    torch.save({"x": object()}, pickled)
    lx_run = tmp_path / "lxmert-run"
    lx_run.mkdir()
    (lx_run / "model_config.json").write_text(json.dumps({"l_layers": 9, "x_layers": 5, "r_layers": 5}))
    fin = tmp_path / "finetune-run"
    fin.mkdir()
    cfg.to_json_file(fin / "model_config.json")
    (fin / "finetune.json").write_text(json.dumps({"task": "vqa"}))
    big = tmp_path / "uniter-2048.pt"
    torch.save(UniterModel(tiny_config(img_dim=2048)).state_dict(), big)
    cases = {lx: "is an LXMERT checkpoint, not UNITER (use --model lxmert)",
             hero: "is a HERO checkpoint, not UNITER",
             pickled: "not a loadable state dict of tensors",
             lx_run: "is an LXMERT run, not UNITER: use --model lxmert",
             fin: "is a fastvl finetune run (task vqa)",
             big: "the model takes 2048-d region features",
             tmp_path / "missing": "no such file"}
    for path, message in cases.items():
        code, _, err = run_cli(["probe", "--checkpoint", str(path), "--out", str(tmp_path / "o"), "--no-progress"],
                               capsys)
        assert code == 2, (path, err)
        assert err.startswith("fastvl probe: error: argument --checkpoint") and message in err, err
        assert len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def lxmert_run(tmp_path_factory):
    from fastvl.models.lxmert import LxmertConfig, LxmertForPreTraining

    corpus = synthetic_corpus()
    cfg = LxmertConfig(vocab_size=corpus.vocab_size, hidden_size=24, num_attention_heads=3, intermediate_size=40,
                       l_layers=1, x_layers=2, r_layers=1, visual_feat_dim=corpus.img_dim, num_qa_labels=3,
                       num_object_labels=corpus.img_label_dim, num_attr_labels=4, max_position_embeddings=64)
    torch.manual_seed(2)
    run = tmp_path_factory.mktemp("probe-lx") / "run"
    run.mkdir()
    cfg.to_json_file(run / "model_config.json")
    ckpt.save_checkpoint(run, 4, LxmertForPreTraining(cfg), {"step": 4})
    return run, cfg


@pytest.mark.slow
def test_probe_cli_lxmert(lxmert_run, run_folder, tmp_path, capsys):
    run, cfg = lxmert_run
    other = tmp_path / "uniter-probes.json"  # another run's figures, drawn beside LXMERT's in the NMI plot
    other.write_text(json.dumps({"model": "uniter", "trained": {"fusion_nmi": [0.9, 0.5, 0.2]},
                                 "control": {"fusion_nmi": [1.0, 1.0, 1.0]}}))
    out = tmp_path / "lx"
    code, stdout, err = run_cli(["probe", "--model", "lxmert", "--checkpoint", str(run), "--out", str(out),
                                 "--examples", "24", "--folds", "2", "--no-progress", "--controls", "1", "--compare",
                                 str(other), "--save-maps", str(tmp_path / "maps")], capsys)
    assert code == 0, err
    items = list(read_maps(tmp_path / "maps"))  # streamed to disk, one shard per batch
    assert len(items) == 24
    for item in items[:5]:
        t, n = item["txt_len"], item["img_len"]
        assert item["cross_l2v"].shape == (cfg.x_layers, cfg.num_attention_heads, t, n)
        assert item["cross_v2l"].shape == (cfg.x_layers, cfg.num_attention_heads, n, t)
        assert item["language_hidden"].shape == (1 + cfg.l_layers + cfg.x_layers, t, cfg.hidden_size)
        torch.testing.assert_close(item["cross_v2l"].float().sum(-1), torch.ones(cfg.x_layers, cfg.num_attention_heads,
                                                                                n), atol=2e-3, rtol=0)
    doc = json.loads((out / "probes.json").read_text())
    f = doc["trained"]
    assert doc["model"] == "lxmert" and (f["layers"], f["heads"]) == (cfg.x_layers, cfg.num_attention_heads)
    assert len(f["fusion_nmi"]) == cfg.x_layers + 1  # the cross encoder's input, then each cross layer
    assert all(len(v) == 1 + cfg.l_layers + cfg.x_layers for v in f["linguistic"].values())
    assert "cls_text_mass" not in f and "two-stream" in f["modality_note"]
    assert np.asarray(f["coreference_head_gap"]).shape == (cfg.x_layers, cfg.num_attention_heads)
    assert doc["plots"] == [str(out / "nmi_per_layer.png"), str(out / "attention_regions.png")]
    # wrong family either way round
    code, _, err = run_cli(["probe", "--model", "uniter", "--checkpoint", str(run), "--out", str(out)], capsys)
    assert code == 2 and "is an LXMERT run, not UNITER: use --model lxmert" in err
    code, _, err = run_cli(["probe", "--model", "lxmert", "--checkpoint", str(run_folder[0]), "--out", str(out)],
                           capsys)
    assert code == 2 and "UNITER" in err and "use --model uniter" in err, err


@pytest.mark.slow
def test_probe_cli_checkpoint_files(run_folder, lxmert_run, tmp_path, capsys):
    """A checkpoint FILE (official key layout) with its config gives the figures its run folder gives."""
    run, model, cfg = run_folder
    (tmp_path / "uniter").mkdir()
    torch.save(model.state_dict(), tmp_path / "uniter" / "uniter.pt")
    args = ["--examples", "16", "--folds", "2", "--no-progress", "--controls", "1"]
    code, _, err = run_cli(["probe", "--checkpoint", str(run), "--out", str(tmp_path / "a"), *args], capsys)
    assert code == 0, err
    code, _, err = run_cli(["probe", "--checkpoint", str(tmp_path / "uniter" / "uniter.pt"), "--config",
                            str(run / "model_config.json"), "--out", str(tmp_path / "b"), *args], capsys)
    assert code == 0, err
    a, b = (json.loads((tmp_path / x / "probes.json").read_text()) for x in ("a", "b"))
    assert b["checkpoint"]["kind"] == "checkpoint file"
    for key in ("cls_text_mass", "fusion_nmi", "img2txt_share"):
        np.testing.assert_allclose(b["trained"][key], a["trained"][key], rtol=1e-5)
        np.testing.assert_allclose(b["control"][key], a["control"][key], rtol=1e-5)
    # an LXMERT encoder file in the port's layout, its config.json beside it (found without --config)
    from fastvl.models.lxmert import LxmertForPreTraining
    from fastvl.recipes.lxmert_pretrain import load_lxmert_run

    lx_run, lx_cfg = lxmert_run
    lx_model, _ = load_lxmert_run(lx_run)
    assert isinstance(lx_model, LxmertForPreTraining)
    (tmp_path / "lx").mkdir()
    torch.save(lx_model.state_dict(), tmp_path / "lx" / "pytorch_model.bin")
    lx_cfg.to_json_file(tmp_path / "lx" / "config.json")
    code, _, err = run_cli(["probe", "--model", "lxmert", "--checkpoint", str(run / ".." / "run"), "--out",
                            str(tmp_path / "c"), *args], capsys)
    assert code == 2 and "use --model uniter" in err  # a UNITER run given as LXMERT
    for src, out in ((lx_run, "d"), (tmp_path / "lx" / "pytorch_model.bin", "e")):
        code, _, err = run_cli(["probe", "--model", "lxmert", "--checkpoint", str(src), "--out", str(tmp_path / out),
                                *args], capsys)
        assert code == 0, err
    d, e = (json.loads((tmp_path / x / "probes.json").read_text()) for x in ("d", "e"))
    np.testing.assert_allclose(e["trained"]["fusion_nmi"], d["trained"]["fusion_nmi"], rtol=1e-5)
    np.testing.assert_allclose(e["trained"]["coreference_head_gap"], d["trained"]["coreference_head_gap"], rtol=1e-4,
                               atol=1e-7)
