"""params.yaml validation: unknown keys and bad values stop a stage before any work."""

from pathlib import Path

import pytest
import yaml

from textdiff.errors import TextDiffError
from textdiff.params import load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.teacher.steps == (50, 150, 250)
    assert params.teacher.blocks == (6, 8, 12, 16)
    assert params.train.fusion == "cross_attention"
    assert params.text.max_length == 10
    assert params.pretrain.config["num_channels"] > 0


def test_defaults_when_sections_absent():
    params = parse_params({})
    assert params.data.image_size == 256
    assert params.train.seed == 40 and params.train.epochs == 50
    assert params.train.milestones == (60,) and params.train.dice_weight == 1.5


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"train": {"fusion": "foo"}}, ["train.fusion", "foo"]),
        ({"train": {"epochs": -1}}, ["train.epochs", "-1"]),
        ({"train": {"fusoin": "none"}}, ["unknown key", "train.fusoin"]),
        ({"trian": {}}, ["unknown section", "trian"]),
        ({"extract": {"views": 3}}, ["extract.views"]),
        ({"extract": {"dtype": "int8"}}, ["extract.dtype"]),
        ({"teacher": {"steps": [50, 2000]}}, ["teacher.steps", "2000"]),
        ({"teacher": {"blocks": [8, 6]}}, ["teacher.blocks"]),
        ({"teacher": {"steps": "fifty"}}, ["teacher.steps"]),
        ({"train": {"augment": "yes"}}, ["train.augment"]),
        ({"data": {"image_size": 250}}, ["data.image_size"]),
        ({"teacher": {"config": {"image_size": 64, "num_channels": 32, "num_res_blocks": 1, "bogus": 1}}},
         ["teacher.config", "bogus"]),
        ({"train": "cross_attention"}, ["train", "mapping"]),
        ({"pretrain": {"export_dtype": "int8"}}, ["pretrain.export_dtype", "int8"]),
    ],
)
def test_bad_values_are_one_line_errors(raw, words):
    with pytest.raises(TextDiffError) as err:
        parse_params(raw, source="p.yaml")
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_load_params_errors_name_the_file(tmp_path):
    with pytest.raises(TextDiffError, match="missing.yaml: params file not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(TextDiffError, match="bad.yaml: not valid YAML"):
        load_params(bad)


def test_ints_accepted_for_floats_and_scalar_lists(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump({"train": {"lr": 1, "milestones": 30}}))
    params = load_params(f)
    assert params.train.lr == 1.0 and isinstance(params.train.lr, float)
    assert params.train.milestones == (30,)
