"""The compile-time structure of one fused update: which inputs each output row uses.

A launch's coefficient matrix (rows: written slots, then out; columns: read slots, then the
feature) is dense over the inputs of all rows, and several rows are often equal (FoCa's new
F_k and the caller's out). The kernels take the structure as constants, so each output row
costs one multiply-add per term it really has:

* ``rows``: the distinct rows, each computed once and stored to every destination using it;
* ``nz``: bit ``r * num_in + i`` set when distinct row r has a term in input i; a zero
  coefficient is "not a term" (a non-finite value in an unused input never reaches a row);
* ``first``: 4 bits per distinct row, the input of its first term (the accumulator starts
  there instead of at zero);
* ``copy``: bit r set when row r is one input times exactly 1.0 (reuse): stored as loaded,
  without arithmetic;
* ``dest_row``: 4 bits per destination, the distinct row it stores.

Coefficient values stay data (scalars or a device tensor); only the pattern is a constant,
and a method's skipped steps all share one pattern.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

MAX_DESTS = 16  # dest_row / first use 4 bits per entry


@dataclass(frozen=True)
class RowPattern:
    num_in: int
    rows: Tuple[Tuple[float, ...], ...]  # distinct rows, coefficients over the inputs
    dest_row: int
    nz: int
    first: int
    copy: int

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def flat(self) -> Tuple[float, ...]:
        """The distinct rows' coefficients, row-major."""
        return tuple(c for row in self.rows for c in row)

    @property
    def key(self) -> tuple:
        """What the compiled kernel depends on (everything but the coefficient values)."""
        return (self.num_in, self.num_rows, self.dest_row, self.nz, self.first, self.copy)


def row_pattern(coef: Sequence[float], n_dest: int, num_in: int) -> RowPattern:
    if n_dest > MAX_DESTS or num_in > MAX_DESTS:
        raise ValueError(f"a fused update takes at most {MAX_DESTS} outputs and inputs")
    rows: list = []
    dest_row = 0
    for j in range(n_dest):
        row = tuple(float(c) for c in coef[j * num_in: (j + 1) * num_in])
        if row not in rows:
            rows.append(row)
        dest_row |= rows.index(row) << (4 * j)
    nz = first = copy = 0
    for r, row in enumerate(rows):
        terms = [i for i, c in enumerate(row) if c != 0.0]
        for i in terms:
            nz |= 1 << (r * num_in + i)
        if terms:
            first |= terms[0] << (4 * r)
        if len(terms) == 1 and row[terms[0]] == 1.0:
            copy |= 1 << r
    return RowPattern(num_in, tuple(rows), dest_row, nz, first, copy)
