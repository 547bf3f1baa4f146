"""Report workbooks: one sentence per image (the LViT release's `<Split>_text.xlsx`).

Rules: the first sheet is read; the header is the first row (among the first 20) holding both
`Image` and `Description` (case and surrounding spaces ignored; extra columns are ignored); a row
is matched to an image by the stem of its `Image` cell (`X.png`, `X.tif` and `X` all name image
`X`); report text has its whitespace collapsed to single spaces; rows for images that are not in
the split's img/ folder are ignored (the published workbooks are the source of truth for text, the
img/ folder for which images exist); duplicate rows for one image are fine when their text agrees
and an error when it differs.
"""

from __future__ import annotations

from pathlib import Path

from textdiff.data.images import IMAGE_SUFFIXES, describe
from textdiff.errors import TextDiffError

IMAGE_COLUMN = "Image"
TEXT_COLUMN = "Description"
_HEADER_SEARCH_ROWS = 20


def report_key(value: object) -> str:
    """The image id an `Image` cell names: 'X.png', 'X.tif', 'img/X.png' and 'X' all name 'X'."""
    name = str(value).strip().replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in IMAGE_SUFFIXES + (".jpg", ".jpeg", ".bmp"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def cell_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return " ".join(str(value).split())


def read_reports(path: str | Path) -> dict[str, str]:
    """A report workbook as {image id: report}. Empty reports are kept as "" (the caller decides,
    since only rows for existing images matter); conflicting duplicates are an error."""
    path = Path(path)
    if not path.is_file():
        raise TextDiffError(f"{path}: report workbook not found")
    try:
        import openpyxl

        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as err:
        raise TextDiffError(f"{path}: cannot read the workbook ({describe(err)})") from None
    try:
        if not wb.worksheets:
            raise TextDiffError(f"{path}: workbook has no sheets")
        ws = wb.worksheets[0]
        rows = ws.iter_rows(values_only=True)
        header: list[str] | None = None
        first_header: list[str] | None = None
        header_row = 0
        for header_row, row in enumerate(rows, start=1):
            cells = [cell_text(v) for v in row]
            if not any(cells):
                continue
            if first_header is None:
                first_header = [c for c in cells if c]
            lowered = [c.lower() for c in cells]
            if IMAGE_COLUMN.lower() in lowered and TEXT_COLUMN.lower() in lowered:
                header = lowered
                break
            if header_row >= _HEADER_SEARCH_ROWS:
                break
        if header is None:
            has = ", ".join(repr(c) for c in first_header) if first_header else "none (the sheet is empty)"
            raise TextDiffError(
                f"{path}: sheet '{ws.title}' has no header row with the columns "
                f"'{IMAGE_COLUMN}' and '{TEXT_COLUMN}'; its columns: {has}"
            )
        image_col = header.index(IMAGE_COLUMN.lower())
        text_col = header.index(TEXT_COLUMN.lower())
        reports: dict[str, str] = {}
        where: dict[str, int] = {}
        for row_number, row in enumerate(rows, start=header_row + 1):
            image = row[image_col] if image_col < len(row) else None
            if image is None or not str(image).strip():
                continue  # a blank row
            key = report_key(image)
            text = cell_text(row[text_col] if text_col < len(row) else None)
            if key in reports and reports[key] and text and reports[key] != text:
                raise TextDiffError(
                    f"{path}: image '{key}' has two different reports "
                    f"(rows {where[key]} and {row_number}): {reports[key]!r} vs {text!r}"
                )
            if key not in reports or not reports[key]:
                reports[key] = text
                where[key] = row_number
        return reports
    finally:
        wb.close()


def report_for_image(reports: dict[str, str], workbook: Path, image_path: Path) -> str:
    """One image's report from a workbook `read_reports` read. A missing row and an empty report
    are one-line errors, the same for training and `textdiff predict`: the classifier never saw an
    image without its sentence."""
    image_id = image_path.stem
    if image_id not in reports:
        raise TextDiffError(f"{workbook}: no report row for image '{image_id}' ({image_path.name})")
    if not reports[image_id]:  # read_reports collapses whitespace: a blank cell is ""
        raise TextDiffError(f"{workbook}: the report for image '{image_id}' is empty")
    return reports[image_id]
