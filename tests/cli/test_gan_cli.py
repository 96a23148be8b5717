"""``fastvl gan``: synthesize from a boxes.json, and one-line user errors naming the argument (missing checkpoint,
another model's checkpoint, bad layout files, an occupied output folder)."""

from __future__ import annotations

import json

import pytest
import torch
from cli_run import run_cli

from fastvl.recipes.bachgan import GanSettings, train_bachgan
from fastvl.train import checkpoint as ckpt


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory):
    """A tiny trained BachGAN run folder (16 x 16 synthetic layouts, 1 step) and another model's checkpoint."""
    import os

    os.environ["FASTVL_BACKEND"] = "spade_norm=reference"  # the wiring is under test (see tests/tasks/test_gan.py)
    try:
        root = tmp_path_factory.mktemp("gan")
        s = GanSettings(output=str(root / "run"), size=(16, 16), model_overrides={"ngf": 2, "spade_hidden": 4,
                                                                                  "ndf": 4},
                        options={"n_train": 12, "n_val": 2}, batch_size=4, steps=1, sample_every=1, progress=False,
                        memory_fraction=0.5)
        train_bachgan(s, resume=False, log=lambda *_: None)
        other = root / "other"
        other.mkdir()
        ckpt.save_checkpoint(other, 1, torch.nn.Linear(2, 2), {"step": 1})
        yield root
    finally:
        os.environ.pop("FASTVL_BACKEND", None)


def _boxes(path, doc) -> str:
    path.write_text(json.dumps(doc))
    return str(path)


def test_synthesize_from_boxes_json(gan_run, tmp_path, capsys, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("FASTVL_BACKEND", "spade_norm=reference")
    layout = _boxes(tmp_path / "boxes.json", {"size": [16, 16], "boxes": [{"class": "car", "box": [1, 9, 8, 14]},
                                                                          {"class": 10, "box": [3, 1, 12, 4]}]})
    out = tmp_path / "image.png"
    code, stdout, err = run_cli(["gan", "synthesize", "--checkpoint", str(gan_run / "run"), "--layout", layout,
                                 "--out", str(out)], capsys)
    assert code == 0, err
    assert json.loads(stdout)["boxes"] == 2
    img = Image.open(out)
    assert img.size == (16, 16) and img.mode == "RGB"


def _one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastvl gan: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_missing_checkpoint(gan_run, tmp_path, capsys):
    layout = _boxes(tmp_path / "b.json", {"size": [16, 16], "boxes": [{"class": "car", "box": [0, 0, 4, 4]}]})
    missing = str(tmp_path / "nope")
    code, _, err = run_cli(["gan", "synthesize", "--checkpoint", missing, "--layout", layout, "--out",
                            str(tmp_path / "x.png")], capsys)
    _one_line_error(code, err, "--checkpoint", missing)
    code, _, err = run_cli(["gan", "eval", "--checkpoint", missing], capsys)
    _one_line_error(code, err, "--checkpoint", missing)


def test_wrong_checkpoint_type(gan_run, tmp_path, capsys):
    layout = _boxes(tmp_path / "b.json", {"size": [16, 16], "boxes": [{"class": "car", "box": [0, 0, 4, 4]}]})
    for path in (gan_run / "other", gan_run / "other" / "checkpoints" / "step_00000001"):
        code, _, err = run_cli(["gan", "synthesize", "--checkpoint", str(path), "--layout", layout, "--out",
                                str(tmp_path / "x.png")], capsys)
        _one_line_error(code, err, "--checkpoint", "not a BachGAN run")
    fake = tmp_path / "fake"
    (fake / "checkpoints").mkdir(parents=True)
    (fake / "bachgan.json").write_text(json.dumps({"kind": "uniter"}))
    code, _, err = run_cli(["gan", "eval", "--checkpoint", str(fake)], capsys)
    _one_line_error(code, err, "--checkpoint")


@pytest.mark.parametrize("doc, needle", [
    ("{not json", "cannot read JSON"),
    ({"size": [16, 16], "boxes": [{"class": "sky", "box": [0, 0, 4, 4]}]}, "background class"),
    ({"size": [16, 16], "boxes": [{"class": "dragon", "box": [0, 0, 4, 4]}]}, "unknown class"),
    ({"size": [16, 16], "boxes": [{"class": "car", "box": [0, 0, 40, 4]}]}, "outside the image"),
    ({"size": [32, 32], "boxes": [{"class": "car", "box": [0, 0, 4, 4]}]}, "size"),
    ({"size": [16, 16], "boxes": []}, "non-empty"),
])
def test_bad_layout_file(gan_run, tmp_path, capsys, doc, needle):
    path = tmp_path / "layout.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    code, _, err = run_cli(["gan", "synthesize", "--checkpoint", str(gan_run / "run"), "--layout", str(path), "--out",
                            str(tmp_path / "x.png")], capsys)
    _one_line_error(code, err, "--layout", needle)


def test_other_argument_errors(gan_run, tmp_path, capsys):
    layout = _boxes(tmp_path / "b.json", {"size": [16, 16], "boxes": [{"class": "car", "box": [0, 0, 4, 4]}]})
    code, _, err = run_cli(["gan", "synthesize", "--checkpoint", str(gan_run / "run"), "--layout",
                            str(tmp_path / "none.json"), "--out", str(tmp_path / "x.png")], capsys)
    _one_line_error(code, err, "--layout", "none.json")
    code, _, err = run_cli(["gan", "synthesize", "--checkpoint", str(gan_run / "run"), "--layout", layout, "--out",
                            str(tmp_path / "x.jpg")], capsys)
    _one_line_error(code, err, "--out", ".png")
    code, _, err = run_cli(["gan", "train", "--output", str(gan_run / "run")], capsys)
    _one_line_error(code, err, "--output", "--resume")
    code, _, err = run_cli(["gan", "train", "--vgg", str(tmp_path / "vgg.pth"), "--output", str(tmp_path / "o")],
                           capsys)
    _one_line_error(code, err, "--vgg")
    code, _, err = run_cli(["gan", "train", "--data", "cityscapes", "--output", str(tmp_path / "o")], capsys)
    _one_line_error(code, err, "--data-root")
    code, _, err = run_cli(["gan", "train", "--steps", "-3"], capsys)
    assert code == 2 and "--steps" in err
    code, _, err = run_cli(["gan"], capsys)
    assert code == 2 and "train" in err
