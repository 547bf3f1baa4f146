"""Queue the label-efficiency grid as DVC experiments, then draw the curves.

    python benchmarks/label_grid.py                 # print the `dvc exp run --queue` lines
    python benchmarks/label_grid.py --queue         # queue them
    dvc queue start && dvc queue status             # run them (one worker: they share the CPU)
    textdiff report --curves                        # metrics/label_efficiency.md, .png, per-method CSVs

Methods: TextDiff (teacher + report), the same with `train.fusion: none`, the raw-RGB control
(`teacher.kind: rgb`), the MONAI U-Net from scratch (`baseline.kind: unet`), Cellpose 3 from scratch
(`baseline.kind: cellpose`, its own loop at 24 crops per epoch at every N: the full set's budget) and
hematoxylin + Otsu (`baseline.kind: classic`, no labels: one run). N in {1, 2, 4, 8} with three seeds
each (the seed picks the nested labelled subset and the initialisation), N = 24 (all) with one. Every run trains for the
same `train.steps` (default 480 = the default pipeline's 20 epochs x 24 images), validating every 24
steps on the whole val split (6 labelled images: with N = 1 the selection sees more labels than the
training does; say so when you quote N = 1). The teacher's cache is shared: a grid re-extracts only
for the RGB control's own cache.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess

METHODS = {
    "textdiff": [],
    "image_only": ["train.fusion=none"],
    "rgb": ["teacher.kind=rgb"],
    "unet": ["baseline.kind=unet"],
    # Cellpose by its own loop and epochs; 24 crops per epoch at every N, the full set's budget.
    "cellpose": ["baseline.kind=cellpose", "baseline.cellpose_crops_per_epoch=24"],
}


def grid(counts: list[int], seeds: list[int], steps: int, val_every: int, methods: list[str]) -> list[list[str]]:
    """The queue lines, most informative first, so a grid cut short by the machine's time still
    gives whole curves: the no-label baseline, then one seed of every method and N < 24, then the
    other seeds, then N = 24 (one seed; it costs the most per run and the default run is its twin)."""
    commands, all_labels = [], []
    if "classic" in methods:
        commands.append(["dvc", "exp", "run", "--queue", "-n", "le-classic", "-S", "baseline.kind=classic",
                         "-S", f"train.steps={steps}"])
    for si, seed in enumerate(seeds):
        for n in counts:
            if n >= 24 and si > 0:
                continue
            for method in (m for m in methods if m != "classic"):
                sets = [*METHODS[method], f"train.num_labeled={n}", f"train.seed={seed}", f"train.steps={steps}",
                        f"train.val_every={val_every}", "evaluate.panels=0"]
                (all_labels if n >= 24 else commands).append(
                    ["dvc", "exp", "run", "--queue", "-n", f"le-{method}-n{n}-s{seed}"]
                    + [x for s in sets for x in ("-S", s)])
    return commands + all_labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="*", default=[1, 2, 4, 8, 24])
    ap.add_argument("--seeds", type=int, nargs="*", default=[40, 41, 42])
    ap.add_argument("--steps", type=int, default=480)
    ap.add_argument("--val-every", type=int, default=24)
    ap.add_argument("--methods", nargs="*", default=[*METHODS, "classic"], choices=[*METHODS, "classic"])
    ap.add_argument("--queue", action="store_true", help="run the lines (default: print them)")
    args = ap.parse_args()
    commands = grid(args.counts, args.seeds, args.steps, args.val_every, args.methods)
    for cmd in commands:
        print(shlex.join(cmd))
        if args.queue:
            subprocess.run(cmd, check=True)
    print(f"# {len(commands)} runs" + ("" if args.queue else " (not queued: add --queue)"))


if __name__ == "__main__":
    main()
