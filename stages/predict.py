"""`textdiff predict`: segment new images and whole slides with a trained model (not a DVC stage:
it reads no params, only the model's model.json). The work is `textdiff.predict.run.predict_inputs`."""

from __future__ import annotations

from pathlib import Path

from textdiff.paths import CLASSIFIER_DIR
from textdiff.predict.run import predict_inputs


def run(inputs: list[Path], out: Path, text: str | None = None, reports: Path | None = None,
        model: Path = CLASSIFIER_DIR, teacher: Path | None = None, scale: float | None = None,
        device: str = "auto", masks: Path | None = None, mpp: float | None = None, whole: bool = False,
        overwrite: bool = False, slide_tile: int | None = None, batch_size: int = 1, views: int | None = None) -> int:
    """Returns the number of inputs that failed (the CLI exits non-zero when it is not 0)."""
    return predict_inputs(inputs, out, text=text, reports=reports, model=model, teacher=teacher, scale=scale,
                          device=device, masks=masks, mpp=mpp, whole=whole, overwrite=overwrite,
                          slide_tile=slide_tile, batch_size=batch_size, views=views)
