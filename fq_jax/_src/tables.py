"""Plain-text tables: the one formatter behind `fq-jax inspect`, `fq-jax evaluate --layers` and
the benchmarks' printed tables.

Cells are escaped before they are measured, so text taken from a file (an array path, say) can
neither move the terminal's cursor, change its colours, nor start a fake row: every character
Python does not call printable (controls, bidi and other format characters, line separators,
lone surrogates, unassigned code points, spaces other than ' ') is shown as a Python escape
(`\\x1b`, `\\u202e`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence


def escape_text(text: str) -> str:
  """`text` with every non-printable character (`str.isprintable`) written as an escape.

  Args:
    text: any string (it may contain lone surrogates).

  Returns:
    A string safe to print on one line of a terminal; printable text (including non-ASCII
    letters) is unchanged.

  Example:
    >>> escape_text("conv1\\x1b[2J/kernel")
    'conv1\\\\x1b[2J/kernel'
  """
  if text.isprintable():
    return text
  out = []
  for ch in text:
    if not ch.isprintable():
      code = ord(ch)
      out.append(
        f"\\x{code:02x}"
        if code < 0x100
        else f"\\u{code:04x}"
        if code < 0x10000
        else f"\\U{code:08x}"
      )
    else:
      out.append(ch)
  return "".join(out)


def format_table(
  rows: Sequence[Sequence[object]],
  columns: Sequence[str],
  *,
  left: Collection[str] = (),
  separator: str = "  ",
  markdown: bool = False,
) -> str:
  """Formats rows under a header and a dashed rule, each column as wide as its widest cell.

  Args:
    rows: one sequence of cells per row, in the order of `columns`; a cell is any object
      (None prints as an empty cell, anything else as `str(cell)`, escaped by `escape_text`).
    columns: the column names (the header line).
    left: names of the columns aligned left (text); the others are aligned right (numbers).
    separator: the text between two columns (plain tables).
    markdown: a Markdown (GitHub) table instead, `|` in cells escaped, the rule marking the
      right-aligned columns (`---:`); for BENCHMARKS.md.

  Returns:
    The table's lines joined by newlines (no trailing newline).

  Raises:
    ValueError: a row whose length differs from the number of columns.

  Example:
    >>> print(format_table([["conv", 3], ["fc", 10]], ["layer", "bits"], left={"layer"}))
    layer  bits
    -----  ----
    conv      3
    fc       10
  """
  cells = []
  for i, row in enumerate(rows):
    if len(row) != len(columns):
      raise ValueError(f"row {i} has {len(row)} cells for {len(columns)} columns")
    cells.append(["" if c is None else escape_text(str(c)) for c in row])
  header = [escape_text(c) for c in columns]
  if markdown:
    cells = [[c.replace("|", "\\|") for c in r] for r in cells]
    header = [c.replace("|", "\\|") for c in header]
  widths = [max([len(header[j])] + [len(r[j]) for r in cells]) for j in range(len(columns))]
  is_left = [c in left for c in columns]

  def line(values: Sequence[str]) -> str:
    padded = [v.ljust(w) if lft else v.rjust(w) for v, w, lft in zip(values, widths, is_left)]
    if markdown:
      return "| " + " | ".join(padded) + " |"
    return separator.join(padded).rstrip()

  if markdown:
    rule = (
      "|"
      + "|".join("-" * (w + 2) if lft else "-" * (w + 1) + ":" for w, lft in zip(widths, is_left))
      + "|"
    )
  else:
    rule = line(["-" * w for w in widths])
  return "\n".join([line(header), rule, *(line(r) for r in cells)])
