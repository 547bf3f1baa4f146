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
