"""The report's headline and CSV from hand-made figures (trained model + two controls)."""

import csv
import json

import pytest

from fastvl.probe.report import csv_rows, headline, write_report


def _fig(nmi, text, coref, pred, length):
    return {"layers": 1, "heads": 2, "fusion_nmi": nmi, "cls_text_mass": [text],
            "cls_image_mass": [[1 - t for t in text]],
            "uniform_text_share": 0.8, "img2txt_share": [[1.0, 0.2]], "txt2img_share": [[0.0, 0.6]],
            "img2txt_heads": [[0, 0]], "txt2img_heads": [[0, 1]],
            "coreference": {"accuracy": coref, "majority": 0.5},
            "relations": {"predicate": {"accuracy": pred, "majority": 0.25},
                          "same colour as": {"skipped": "one class only", "n": 4, "classes": {"no": 4}}},
            "linguistic": {"length": [{"accuracy": length[0], "majority": 0.4},
                                      {"accuracy": length[1], "majority": 0.4}]}}


def test_headline_and_csv(tmp_path):
    trained = _fig([0.9, 0.2], [0.9, 0.7], 0.8, 0.6, [0.5, 0.9])
    controls = [_fig([1.0, 1.0], [0.8, 0.8], 0.5, 0.3, [0.6, 0.6]), _fig([1.0, 0.8], [0.8, 0.6], 0.6, 0.4, [0.7, 0.5])]
    h = headline(trained, controls)
    assert h["fusion_nmi_last_layer"] == {"trained": 0.2, "control": pytest.approx(0.9),
                                          "control_std": pytest.approx(0.1), "controls": 2}
    assert h["cls_text_mass_mean"]["trained"] == pytest.approx(0.8)
    assert h["cls_text_mass_mean"]["control"] == pytest.approx((0.8 + 0.7) / 2)
    assert h["cls_text_mass_mean"]["chance"] == 0.8
    assert h["img2txt_heads"] == {"trained": 1.0, "control": 1.0, "control_std": 0.0, "controls": 2, "of": 2}
    assert h["coreference_accuracy"]["control"] == pytest.approx(0.55)
    assert h["coreference_accuracy"]["chance"] == 0.5
    assert h["relation_predicate_accuracy"]["control_std"] == pytest.approx(0.05)
    assert h["relation_same_colour_as_accuracy"]["skipped"] == "one class only"
    assert h["linguistic_length_max_over_layers"]["trained"] == 0.9
    assert h["linguistic_length_max_over_layers"]["control"] == pytest.approx(0.65)  # max 0.6 and max 0.7
    rows = csv_rows(trained, controls)
    nmi = [r for r in rows if r["probe"] == "fusion"]
    assert [(r["layer"], r["trained"], r["control"]) for r in nmi] == [(0, 0.9, 1.0), (1, 0.2, pytest.approx(0.9))]
    text = [r for r in rows if r["measure"] == "cls_text_mass"]
    assert [(r["layer"], r["head"]) for r in text] == [(0, 0), (0, 1)]
    assert text[1]["control"] == pytest.approx(0.7) and text[1]["chance"] == 0.8
    ling = [r for r in rows if r["probe"] == "linguistic"]
    assert [r["control"] for r in ling] == [pytest.approx(0.65), pytest.approx(0.55)]
    doc = write_report({"model": trained, "controls": controls, "control": controls[0], "settings": {"seed": 0}},
                       tmp_path, {"model": "uniter"})
    assert json.loads((tmp_path / "probes.json").read_text()) == json.loads(json.dumps(doc))
    with open(tmp_path / "probes.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
