"""The `textdiff` command. Each sub-command is a DVC stage or a user tool.

User errors (`TextDiffError`) print one line and exit 1, never a traceback; so does a file the
machine will not let us read or write (an OSError of a full disk, a read-only folder, permissions)
that no stage named more precisely. A Ctrl-C exits 130.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import typer

from textdiff.errors import WRITE_ERRNOS, TextDiffError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="TextDiff: frozen diffusion teacher + clinical text -> pixel classifier.")


def user_errors(fn: Callable) -> Callable:
    """Turn `TextDiffError` (and a machine's refusal to write) into a one-line message and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TextDiffError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
        except OSError as err:
            if err.errno not in WRITE_ERRNOS:
                raise
            typer.echo(f"error: {err.filename or 'a file'}: {os.strerror(err.errno).lower()}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


PARAMS = typer.Option(Path("params.yaml"), "--params", "-p", help="The params file (DVC's params.yaml).")


@app.command()
@user_errors
def prepare(params: Path = PARAMS) -> None:
    """Validate the dataset and write resized splits to data/prepared/."""
    from stages import prepare as stage

    stage.run(params)


@app.command()
@user_errors
def pretrain(params: Path = PARAMS) -> None:
    """Train the in-domain ADM teacher on unlabeled train+val images (skipped if teacher.checkpoint is set)."""
    from stages import pretrain as stage

    stage.run(params)


@app.command()
@user_errors
def extract(
    params: Path = PARAMS,
    rebuild: bool = typer.Option(True, "--rebuild/--no-rebuild",
                                 help="Rebuild a cache made with other params (default) or refuse it."),
) -> None:
    """Run the teacher once per image/view/step and cache features + text embeddings in zarr."""
    from stages import extract as stage

    stage.run(params, rebuild=rebuild)


@app.command()
@user_errors
def train(params: Path = PARAMS) -> None:
    """Train the pixel classifier on the cached features (the teacher never runs)."""
    from stages import train as stage

    stage.run(params)


@app.command()
@user_errors
def evaluate(params: Path = PARAMS) -> None:
    """Test-split Dice/IoU/AJI/PQ, overlay PNGs and probability maps (HDF5)."""
    from stages import evaluate as stage

    stage.run(params)


@app.command()
@user_errors
def predict(
    inputs: list[Path] = typer.Argument(..., help="Image files and/or folders of images (.png, .tif, .jpg)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    text: str = typer.Option(None, "--text", help="One report sentence used for every image."),
    reports: Path = typer.Option(None, "--reports", help="Workbook with Image/Description rows, matched by file stem."),
    model: Path = typer.Option(Path("models/classifier"), "--model", help="Trained classifier folder (or its "
                                                                          "model.pt)."),
    teacher: Path = typer.Option(None, "--teacher", help="The teacher checkpoint, if it moved since training."),
    scale: float = typer.Option(None, "--scale", help="Rescale by this factor and slide the training-size window "
                                "(default: the factor that brings the image's µm/px to the model's)."),
    mpp: float = typer.Option(None, "--mpp", help="Micrometres per pixel of the inputs (default: TIFF resolution "
                              "tags when plausible, else the training images')."),
    whole: bool = typer.Option(False, "--resize-whole", help="Resize every image to the training size whatever its "
                               "size (the paper's protocol; only right for MoNuSeg-like 1000² tiles)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    masks: Path = typer.Option(None, "--masks", help="Folder of ground-truth masks <image id>.png: scores each "
                               "image and draws the evaluation panel (image | truth | prediction | errors)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo images and slides that an earlier run already "
                                   "segmented into --out with this model (by default they are skipped)."),
    slide_tile: int = typer.Option(None, "--slide-tile", help="Slides: the core of each tile in working pixels "
                                   "(default 1024; memory grows with its square, processes share tiles)."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Windows through the teacher and classifier at "
                                   "once (default 1: on a 2-core CPU batches of 4 were 0.77x as fast; a GPU may "
                                   "gain, docs/scale-out.md)."),
    views: int = typer.Option(None, "--views", help="Test-time augmentation: average the maps of 1, 2, 4 or 8 "
                              "dihedral views, each through the teacher (that many times the time; default: "
                              "the model's evaluated setting, extract.eval_views)."),
) -> None:
    """Segment images: masks, pictures, probability maps (HDF5) and a per-nucleus CSV. Resumable: a
    re-run skips what is already done."""
    from stages import predict as stage

    failed = stage.run(inputs, out, text=text, reports=reports, model=model, teacher=teacher, scale=scale,
                       device=device, masks=masks, mpp=mpp, whole=whole, overwrite=overwrite, slide_tile=slide_tile,
                       batch_size=batch_size, views=views)
    if failed:
        raise typer.Exit(1)


@app.command()
@user_errors
def report(
    out: Path = typer.Option(Path("metrics/ablation.md"), "--out", help="Where to write the markdown table."),
    exp_json: Path = typer.Option(None, "--from-json", help="Read saved `dvc exp show --json` output instead."),
    all_commits: bool = typer.Option(False, "--all-commits", "-A",
                                     help="Include experiments of earlier commits (newest run of each variation)."),
    curves: bool = typer.Option(False, "--curves", help="Label-efficiency curves instead: metrics/label_efficiency"
                                ".md, .png and per-method CSVs (runs trained with train.steps)."),
) -> None:
    """Turn the DVC experiments' test metrics into the ablation table (metrics/ablation.md)."""
    from stages import report as stage

    if curves:
        stage.run_curves(stage.CURVES_MD if out == Path("metrics/ablation.md") else out, exp_json, all_commits)
    else:
        stage.run(out, exp_json, all_commits)


cache_app = typer.Typer(no_args_is_help=True, help="Inspect the feature cache.")
app.add_typer(cache_app, name="cache")


@cache_app.command("verify")
@user_errors
def cache_verify(params: Path = PARAMS) -> None:
    """Check the cache is complete and matches params.yaml; exit 1 naming what is wrong."""
    from stages import extract as stage

    problems = stage.verify(params)
    if problems:
        for line in problems:
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(1)
    typer.echo(f"cache/features.zarr: complete and consistent with {params}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
