"""`textdiff report`: dvc exp show --json -> the ablation table."""

from textdiff.report.ablation import markdown_table, rows_from_exp_show


def _record(name, fusion, lam, dice, iou, aji):
    return {
        "rev": name + "0" * 33,
        "name": name,
        "data": {
            "params": {"params.yaml": {"data": {"train": {"fusion": fusion, "contrastive_weight": lam}}}},
            "metrics": {"metrics/test.json": {"data": {"dice": dice, "iou": iou, "aji": aji}}},
        },
    }


EXP_SHOW = [
    {"rev": "workspace", "name": None, "data": {"params": {}, "metrics": {}}},
    {
        **_record("main", "cross_attention", 0.0, 0.7867, 0.6498, 0.55),
        "experiments": [
            {"revs": [_record("zeta1", "none", 0.0, 0.70, 0.55, 0.40)]},
            {"revs": [_record("zeta2", "concat", 0.0, 0.74, 0.60, 0.45)]},
            {"revs": [_record("hier", "hierarchical", 0.0, 0.79, 0.66, 0.56)]},
            {"revs": [_record("lam", "cross_attention", 0.1, 0.80, 0.67, 0.57)]},
            {"revs": [{"rev": "queued", "name": "q", "data": {"params": {}, "metrics": {}}}]},
        ],
    },
]


def test_rows_from_exp_show_skip_runs_without_metrics():
    rows = rows_from_exp_show(EXP_SHOW)
    assert sorted(r["name"] for r in rows) == ["hier", "lam", "main", "zeta1", "zeta2"]


def test_markdown_table_orders_and_labels_variations():
    table = markdown_table(rows_from_exp_show(EXP_SHOW))
    lines = table.strip().splitlines()
    assert lines[0].startswith("| Variation | Description | Dice (%) | Dice vs release GT (%) | IoU (%) | AJI (%)")
    labels = [line.split("|")[1].strip() for line in lines[2:]]
    assert labels == ["ζ1", "ζ2", "TextDiff", "Ext. 1", "Ext. 2"]
    assert "| 78.67 | – | 64.98 | 55.00 |" in lines[4]  # no release scoring in these older runs
    assert "λ = 0.1" in lines[6]


def test_controls_and_duplicates_keep_the_newest():
    base = _record("main", "cross_attention", 0.0, 0.70, 0.55, 0.40)
    base["data"]["timestamp"] = "2026-11-25T07:00:00"
    newer = _record("main2", "cross_attention", 0.0, 0.76, 0.61, 0.39)
    newer["data"]["timestamp"] = "2026-11-25T08:00:00"
    rgb = _record("rgb", "cross_attention", 0.0, 0.60, 0.45, 0.2)
    rgb["data"]["params"]["params.yaml"]["data"]["teacher"] = {"kind": "rgb"}
    rnd = _record("rnd", "cross_attention", 0.0, 0.65, 0.5, 0.3)
    rnd["data"]["params"]["params.yaml"]["data"]["teacher"] = {"kind": "adm", "checkpoint": ""}
    rnd["data"]["params"]["params.yaml"]["data"]["pretrain"] = {"steps": 0}
    rows = rows_from_exp_show([base, newer, rgb, rnd])
    assert sorted(r["name"] for r in rows) == ["main2", "rgb", "rnd"]
    table = markdown_table(rows)
    assert "| TextDiff |" in table and "76.00" in table
    assert "| Control (c) |" in table and "| Control (b), TextDiff |" in table
    assert table.strip().splitlines()[-1].startswith("| Control")


def test_release_switches_are_their_own_rows():
    base = _record("main", "cross_attention", 0.0, 0.7788, 0.639, 0.468)
    base["data"]["metrics"]["metrics/test.json"]["data"]["dice_release"] = 0.7857
    rel = _record("rel", "cross_attention", 0.0, 0.79, 0.65, 0.40)
    rel["data"]["params"]["params.yaml"]["data"]["data"] = {"protocol": "release"}
    rel["data"]["params"]["params.yaml"]["data"]["train"]["classifier"] = "release"
    rows = rows_from_exp_show([base, rel])
    assert sorted(r["name"] for r in rows) == ["main", "rel"]  # not merged as one variation
    table = markdown_table(rows)
    assert "| TextDiff | pixels cross-attend" in table and "| 77.88 | 78.57 |" in table
    assert "| TextDiff, release classifier, release data |" in table


def _seeded(name, fusion, lam, seed, dice, aji_instance):
    record = _record(name, fusion, lam, dice, dice - 0.1, 0.5)
    record["data"]["params"]["params.yaml"]["data"]["train"]["seed"] = seed
    record["data"]["metrics"]["metrics/test.json"]["data"].update({"aji_instance": aji_instance, "pq_instance": 0.5,
                                                                   "dice_native": dice + 0.01})
    return record


def test_seeds_of_one_variation_are_kept_apart_and_averaged():
    from textdiff.report.ablation import CSV_COLUMNS, csv_rows

    runs = [_seeded("td-40", "cross_attention", 0.0, 40, 0.78, 0.60),
            _seeded("td-41", "cross_attention", 0.0, 41, 0.80, 0.62),
            _seeded("td-42", "cross_attention", 0.0, 42, 0.79, 0.58), _seeded("z1-40", "none", 0.0, 40, 0.76, 0.55),
            _seeded("e2-40", "cross_attention", 0.1, 40, 0.785, 0.59)]
    rows = rows_from_exp_show(runs)
    assert len(rows) == 5  # three seeds of TextDiff are three runs, not one kept and two dropped
    table = markdown_table(rows)
    textdiff = next(line for line in table.splitlines() if line.startswith("| TextDiff |"))
    assert "| 79.00 ± 1.00 |" in textdiff  # Dice: mean and sample std of 78, 80, 79
    assert "| 60.00 ± 2.00 |" in textdiff and "| 40, 41, 42 |" in textdiff and "td-40, td-41, td-42" in textdiff
    zeta1 = next(line for line in table.splitlines() if line.startswith("| ζ1 |"))
    assert "| 76.00 |" in zeta1
    assert "| -2.00 | -5.00 | 40 |" in zeta1  # paired with TextDiff's seed 40 (78, 60), not its mean (79, 60)
    assert "| – | – | 40, 41, 42 |" in textdiff  # TextDiff is the reference
    ext2 = next(line for line in table.splitlines() if line.startswith("| Ext. 2 |"))
    assert "| +0.50 | -1.00 | 40 |" in ext2
    out = csv_rows(rows)
    assert [tuple(r) for r in out] == [CSV_COLUMNS] * 5
    assert [(r["variation"], r["seed"]) for r in out] == [("zeta1", 40), ("textdiff", 40), ("textdiff", 41),
                                                          ("textdiff", 42), ("ext2", 40)]
    assert out[1]["dice"] == 0.78 and out[1]["aji_instance"] == 0.6 and out[1]["experiment"] == "td-40"
    assert out[0]["dice_release"] == ""  # not measured in that run: empty, not 0


def test_controls_have_their_own_csv_names():
    from textdiff.report.ablation import variation_key

    row = {"fusion": "cross_attention", "contrastive_weight": 0.0, "teacher_kind": "rgb"}
    assert variation_key(row) == "control_rgb_textdiff"
    row = {"fusion": "hierarchical", "contrastive_weight": 0.0, "random_teacher": True, "classifier": "release"}
    assert variation_key(row) == "control_random_teacher_ext1_release_classifier"


def test_baselines_are_their_own_rows_and_label_curve_runs_are_left_out():
    base = _seeded("td-40", "cross_attention", 0.0, 40, 0.80, 0.61)
    unet = _seeded("unet-40", "cross_attention", 0.0, 40, 0.78, 0.52)
    unet["data"]["params"]["params.yaml"]["data"]["baseline"] = {"kind": "unet"}
    grid = _seeded("grid-n4", "cross_attention", 0.0, 40, 0.75, 0.44)
    grid["data"]["params"]["params.yaml"]["data"]["train"].update({"num_labeled": 24, "steps": 480})
    rows = rows_from_exp_show([base, unet, grid])
    assert sorted(r["name"] for r in rows) == ["td-40", "unet-40"]  # a grid run is not TextDiff's seed 40
    table = markdown_table(rows)
    textdiff = next(line for line in table.splitlines() if line.startswith("| TextDiff |"))
    assert "| 80.00 |" in textdiff
    assert "| Baseline: unet | MONAI U-Net" in table and "| -2.00 | -9.00 | 40 |" in table


def test_past_commits_are_history_but_their_experiments_are_runs():
    """--all-commits lists old commits with whatever params and metrics they held; only the
    workspace, branch tips and experiments are runs."""
    head = _seeded("main", "cross_attention", 0.0, 40, 0.80, 0.61)
    old = _seeded("x", "cross_attention", 0.0, 40, 0.80, 0.61)
    old["name"] = None
    old["data"]["params"]["params.yaml"]["data"]["teacher"] = {"kind": "rgb"}  # committed mid-experiment
    chain = _seeded("y", "none", 0.0, 40, 0.80, 0.61)  # a commit of the experiment's history, not a run
    chain["name"] = None
    old["experiments"] = [{"revs": [_seeded("zeta1-40", "none", 0.0, 40, 0.79, 0.60), chain]}]
    rows = rows_from_exp_show([{"rev": "workspace", "name": None, "data": {"params": {}, "metrics": {}}}, head, old])
    assert sorted(r["name"] for r in rows) == ["main", "zeta1-40"]
