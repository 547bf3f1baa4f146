"""params.yaml validation: unknown keys and bad values stop a stage before any work."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from textdiff.errors import TextDiffError
from textdiff.params import load_params, parse_params, section_dict

REPO = Path(__file__).resolve().parents[1]


def test_params_yaml_spells_out_exactly_the_defaults():
    """One home for defaults: params.yaml holds every key, each at its dataclass default, so the
    file a user edits and the values a missing key falls back to can never disagree."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    defaults = {name: section_dict(section) for name, section in _sections(parse_params({})).items()}
    assert raw == defaults


def _sections(params):
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.name != "path"}


def _split_cells(cell: str) -> list[str]:
    """'600, 8, [50, 150], auto' -> ['600', '8', '[50, 150]', 'auto'] (commas inside brackets kept)."""
    out, depth, current = [], 0, ""
    for ch in cell:
        depth += ch in "[{" and 1 or (ch in "]}" and -1 or 0)
        if ch == "," and depth == 0:
            out.append(current.strip())
            current = ""
        else:
            current += ch
    return out + [current.strip()]


def test_docs_parameter_table_states_the_defaults():
    page = (REPO / "docs" / "parameters.md").read_text()
    section = page.split("\n## Every key\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    defaults = {f"{name}.{k}": v for name, section in _sections(parse_params({})).items()
                for k, v in section_dict(section).items()}
    checked, covered = 0, set()
    for row in rows:
        keys_cell, default_cell = [c.strip() for c in row.strip("|").split("|")][:2]
        keys = [k.strip().strip("`") for k in keys_cell.split(",")]
        section = keys[0].split(".")[0]
        keys = [section + k if k.startswith(".") else k for k in keys]
        if not all(k in defaults for k in keys):
            continue
        covered.update(keys)
        values = _split_cells(default_cell) if len(keys) > 1 else [default_cell]
        assert len(values) == len(keys), row
        for key, shown in zip(keys, values):
            if isinstance(defaults[key], dict):
                continue  # a mapping is described in words ("compact ADM", "{}")
            expected = defaults[key]
            got = yaml.safe_load(shown.strip("`").replace('""', "''"))
            if isinstance(got, str) and isinstance(expected, float):
                got = float(got)  # YAML 1.1 reads 2e-4 as a string
            if isinstance(expected, list):
                got = got if isinstance(got, list) else [got]
            assert got == expected, f"docs/parameters.md says {key} = {shown}, params.py says {expected!r}"
            checked += 1
    assert checked >= 30, checked  # the rows are read, not silently skipped
    missing = sorted(set(defaults) - covered)
    assert covered == set(defaults), f"parameters missing from the docs/parameters.md table: {missing}"


def test_milestones_must_fall_before_the_last_epoch():
    assert parse_params({"train": {"epochs": 20, "milestones": [10, 15]}}).train.milestones == (10, 15)
    with pytest.raises(TextDiffError, match="train.milestones: 60 is not before the last epoch"):
        parse_params({"train": {"epochs": 20, "milestones": [60]}})


@pytest.mark.parametrize(
    "raw, words",
    [
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
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing but a comment\n")
    with pytest.raises(TextDiffError, match="empty.yaml: params file is empty"):
        load_params(empty)
    for key, text in [("train.lr", "train: {lr: .nan}"), ("pretrain.max_minutes", "pretrain: {max_minutes: .inf}")]:
        bad.write_text(text + "\n")  # NaN passes `<= 0` and `< 0`: it used to reach the optimiser
        with pytest.raises(TextDiffError, match=f"bad.yaml: {key} must be a finite number"):
            load_params(bad)
    empty.write_text("{}\n")  # the explicit way to ask for every default
    assert load_params(empty).train == parse_params({}).train


def test_ints_accepted_for_floats_and_scalar_lists(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump({"train": {"lr": 1, "milestones": 15}}))
    params = load_params(f)
    assert params.train.lr == 1.0 and isinstance(params.train.lr, float)
    assert params.train.milestones == (15,)


def test_params_imports_no_model_code():
    """params.py is in every stage's DVC deps: a model import there makes the teacher's stages depend
    on the classifier (editing it would re-run extract)."""
    import ast

    tree = ast.parse((Path(__file__).resolve().parents[1] / "textdiff/params.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m.startswith("textdiff")} == {"textdiff.errors"}


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"train": {"fusion": "foo"}}, ["p.yaml: train.fusion must be one of", "cross_attention", "'foo'"]),
        ({"train": {"classifier": "mine"}}, ["p.yaml: train.classifier", "'mine'"]),
        ({"train": {"classifier": "release", "fusion": "concat"}}, ["train.classifier=release", "concat"]),
        ({"train": {"fusion": "none", "contrastive_weight": 0.1}}, ["train.contrastive_weight", "none"]),
        ({"train": {"distance_decoder": "own"}}, ["train.distance_decoder must be one of", "separate", "'own'"]),
        ({"train": {"autocast": "float16"}}, ["train.autocast must be one of", "bfloat16", "'float16'"]),
    ],
)
def test_the_classifier_owns_its_train_choices(raw, words, tmp_path):
    from textdiff.model.classifier import train_params_problem

    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(raw))
    params = load_params(f)  # params alone accepts them: it holds no list of fusions
    t = params.train
    with pytest.raises(TextDiffError) as err:
        params.refuse(train_params_problem(t.fusion, t.classifier, t.decoder_norm, t.contrastive_weight,
                                            t.distance_decoder, t.autocast))
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)
    assert train_params_problem("cross_attention", "project", "image", 0.0) is None


def test_stages_refuse_owned_choices_before_any_work(tmp_path):
    """The train, prepare, extract and pretrain stages ask the owner's rule first: no cache, data or
    teacher is touched (the paths here do not exist)."""
    from stages import extract, prepare, pretrain, train

    f = tmp_path / "p.yaml"
    bogus = {"image_size": 64, "num_channels": 32, "num_res_blocks": 1, "bogus": 1}
    cases = [
        (train.run, {"train": {"fusion": "foo"}}, "train.fusion"),
        (prepare.run, {"data": {"stain": "purple"}}, "data.stain"),
        (extract.run, {"teacher": {"config": bogus}}, "teacher.config"),
        (extract.verify, {"teacher": {"config": bogus}}, "teacher.config"),
        (pretrain.run, {"pretrain": {"config": bogus}}, "pretrain.config"),
    ]
    for run, raw, key in cases:
        f.write_text(yaml.safe_dump(raw))
        with pytest.raises(TextDiffError, match=f"p.yaml: {key}"):
            run(f, tmp_path / "nowhere")
