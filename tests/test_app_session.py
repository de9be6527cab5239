"""The app's library without a browser: its sessions, the checks on the page's numbers, its handlers'
one-line failures and the code grid. The page itself is tests/test_app.py."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from app_helpers import tiny_models
from PIL import Image

from generator.sampling import SamplingConfig
from provq.app.inputs import Bounds, clamped_hardness, class_index, generate_request
from provq.app.outputs import OutputFolder
from provq.app.session import AppSession
from provq.app.ui import guarded
from provq.app.views import code_colour, code_grid_html
from provq.common.errors import ConfigError

DEFAULTS = dict(class_name="b", cfg_scale=2.0, temperature=1.0, top_k=0, top_p=1.0, seed=0, images=8)


@pytest.mark.parametrize("changed, line", [
    (dict(seed=1e20), "seed must be a whole number in [0, 4294967295], got 1e+20"),
    (dict(seed=2.5), "seed must be a whole number in [0, 4294967295], got 2.5"),
    (dict(top_k=-5), "top-k must be a whole number >= 0, got -5"),
    (dict(images=1000), "images must be a whole number in [1, 16], got 1000"),
    (dict(top_p=0), "top-p must be a number in (0, 1], got 0"),
    (dict(temperature=math.nan), "temperature must be a number >= 0, got nan"),
    (dict(cfg_scale="lots"), "CFG scale must be a number >= 0, got 'lots'"),
    (dict(cfg_scale=True), "CFG scale must be a number >= 0, got True"),
    (dict(class_name="dog"), "class 'dog' is not one of the prior's 3 classes (a, b, c)"),
    (dict(class_name=3), "class 3 is not one of the prior's 3 classes (a, b, c)"),
])
def test_a_number_out_of_range_is_refused_in_one_line_naming_the_range(changed, line):
    with pytest.raises(ConfigError) as error:
        generate_request({**DEFAULTS, **changed}, ["a", "b", "c"])
    assert str(error.value) == line


def test_what_the_library_takes_the_page_takes():
    request = generate_request({**DEFAULTS, "cfg_scale": 50, "temperature": 0, "seed": "7", "images": 16.0}, ["a", "b"])
    assert (request.label, request.seed, request.count) == (1, 7, 16)
    assert request.sampling == SamplingConfig(cfg_scale=50.0, temperature=0.0)
    assert request.describe(["a", "b"]) == "class b, seed 7, CFG 50, temperature 0 (greedy: top-k and top-p do not apply)"
    assert class_index(0, ["a", "b"]) == 0 and class_index("1", ["a", "b"]) == 1
    unlabelled = generate_request({**DEFAULTS, "cfg_scale": 1, "class_name": None}, [])
    assert unlabelled.label == -1
    with pytest.raises(ConfigError, match="CFG scale 2 needs classes, but the prior was trained on unlabelled data"):
        generate_request(DEFAULTS, [])
    assert Bounds(0, 1).check("h", 1) == 1.0 and Bounds(0, whole=True).check("k", 3.0) == 3


def test_a_hardness_outside_0_1_is_clamped_with_a_note():
    assert clamped_hardness(5) == (1.0, "hardness 5 is outside [0, 1]: decoded at 1")
    assert clamped_hardness(-0.5) == (0.0, "hardness -0.5 is outside [0, 1]: decoded at 0")
    assert clamped_hardness(0.25) == (0.25, "")
    with pytest.raises(ConfigError, match="hardness must be a number, got 'x'"):
        clamped_hardness("x")


def test_any_failure_of_a_handler_is_one_line_and_clears_its_outputs(caplog):
    def bug():
        raise OverflowError("Python int too large\nto convert to C long")

    def user_error():
        raise ConfigError("seed must be a whole number")

    assert guarded(bug, 2)() == (None, None, "python -m provq.app: internal error (a bug; the server's log has its "
                                             "traceback): OverflowError: Python int too large to convert to C long")
    assert "Traceback" in caplog.text  # for whoever runs the server, not on the page
    assert guarded(user_error, 1)() == (None, "python -m provq.app: error: seed must be a whole number")
    assert guarded(lambda x: (x, "a note"), 1)(x=3) == (3, "a note")


def test_class_names_come_from_the_prior_then_the_dataset_then_numbers(tmp_path, image_folder):
    tok, prior = tiny_models(tmp_path / "named", label_names=["cat", "dog", "owl", "fox"])
    assert AppSession.load(str(tok), str(prior), str(image_folder)).class_names == ["cat", "dog", "owl", "fox"]
    tok, prior = tiny_models(tmp_path / "unnamed")  # as priors saved before names were kept
    assert AppSession.load(str(tok), str(prior), str(image_folder)).class_names == [f"class{i}" for i in range(4)]
    unnamed = AppSession.load(str(tok), str(prior))
    assert unnamed.class_names == ["0", "1", "2", "3"]
    geometry = unnamed.code_geometry(None)
    assert not geometry.usage_known and len(geometry.codes) == 16  # all codes, said to be of unknown use


def test_an_upload_not_of_the_models_size_carries_a_note(tmp_path):
    session = AppSession.load(str(tiny_models(tmp_path)[0]))
    for name, size, note in [("wide.png", (64, 40), "wide.png is 64x40 px: resized and centre-cropped to 16x16, "
                                                      "the model's input size"),
                             ("big.png", (48, 48), "big.png is 48x48 px: resized to 16x16, the model's input size"),
                             ("fit.png", (16, 16), "")]:
        Image.new("RGB", size, (200, 10, 10)).save(tmp_path / name)
        shown = session.uploaded_image(str(tmp_path / name))
        assert (shown.source, shown.note, shown.pixels.shape) == (name, note, (16, 16, 3))


def test_every_cell_of_the_code_grid_names_its_code():
    codes = np.array([[0, 987], [991, 994]])
    assert code_colour(0) == code_colour(987)  # a colour is only a hint in a codebook of thousands...
    page = code_grid_html(codes)
    for r, c in np.ndindex(codes.shape):  # ...so each cell says which code it is
        assert f'title="row {r}, column {c}: code {codes[r, c]}"' in page
        assert f">{codes[r, c]}</td>" in page
    assert page.count("<tr>") == 2 and page.count("<td") == 4


def test_a_prior_of_another_tokenizer_is_refused_in_one_line(tmp_path, capsys):
    from provq.app.__main__ import main
    from provq.common.cli import run_command

    tok, _ = tiny_models(tmp_path / "a", seed=0)
    _, other_prior = tiny_models(tmp_path / "b", seed=1)
    with pytest.raises(SystemExit) as exit_info:
        run_command("python -m provq.app", main, ["--tokenizer", str(tok), "--prior", str(other_prior)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m provq.app: error: tokenizer fingerprint mismatch")


def test_a_label_out_of_range_is_a_user_error_the_page_shows_in_one_line(tmp_path):
    tok, prior = tiny_models(tmp_path)
    session = AppSession.load(str(tok), str(prior))
    with pytest.raises(ConfigError, match=r"label 7 outside the prior's classes \[0, 4\)"):
        session.generate(7, SamplingConfig(), 0, 2)
    shown = guarded(lambda: session.generate(7, SamplingConfig(), 0, 2), 2)()
    assert shown[-1] == "python -m provq.app: error: label 7 outside the prior's classes [0, 4)"


def test_output_files_are_written_whole_once_per_content_and_pruned_when_old(tmp_path):
    """Sessions showing the same picture share one finished file (Gradio's array cache rewrote it in place,
    and a download at that moment was cut short)."""
    files = OutputFolder(tmp_path / "out", max_age_s=60)
    picture = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    with ThreadPoolExecutor(8) as pool:
        paths = set(pool.map(lambda _: files.image(picture), range(32)))
    assert len(paths) == 1 and np.array_equal(np.asarray(Image.open(paths.pop())), picture)
    codes = np.array([[3, 1], [0, 2]])
    assert np.array_equal(np.load(files.codes(codes)), codes) and files.codes(codes).endswith("codes_2x2.npy")
    old = Path(files.image(picture)).parent
    os.utime(old, (0, 0))  # unused for longer than max_age_s
    files._prune()
    assert not old.exists() and len(list((tmp_path / "out").iterdir())) == 1  # the codes stay
