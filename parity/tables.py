"""Console tables and CSV files of the harness, both through pandas.

:func:`text_table` prints a frame with every cell in full (names are never cut), numbers in
a per-column format, missing values as ``-`` and text left-aligned; :func:`write_csv` writes
rows or a frame as CSV atomically.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from rtdetr_common.weights import atomic_write

MISSING = "-"


def write_csv(path: str | Path, rows: list[dict] | pd.DataFrame) -> None:
    """Writes a frame, or dict rows (columns: the union of their keys, in order), as CSV.

    The file is replaced atomically: a failed write leaves the previous file as it was.
    """
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def _cell(value, spec: str | None) -> str:
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return MISSING
    if spec is None:
        return str(value)
    if spec.endswith("d"):  # counts in a column with gaps come back from pandas as floats
        value = int(value)
    return format(value, spec)


def text_table(frame: pd.DataFrame, formats: dict[str, str] | None = None) -> str:
    """The frame as console text (``DataFrame.to_string``), every cell in full.

    Args:
        frame: The rows; its column labels are the header.
        formats: Format spec per numeric column (``".3g"``, ``"d"``); columns not named are
            text, left-aligned; specs of columns the frame lacks are ignored.

    Returns:
        The table, or ``(no rows)`` for an empty frame.
    """
    formats = formats or {}
    if frame.empty:
        return "(no rows)"
    shown = pd.DataFrame({col: [_cell(v, formats.get(col)) for v in frame[col]]
                          for col in frame.columns})
    header, pad = [], {}
    for col in frame.columns:
        width = max(len(str(col)), int(shown[col].str.len().max()))
        if col in formats:
            header.append(str(col).rjust(width))
            pad[col] = f"{{:>{width}}}".format
        else:
            header.append(str(col).ljust(width))
            pad[col] = f"{{:<{width}}}".format
    text = shown.to_string(index=False, header=header, max_colwidth=None, formatters=pad)
    return "\n".join(line.rstrip() for line in text.splitlines())
