"""Data problems and the error that lists them.

Every problem names where it is (file, 1-based line or row), which field is wrong, what is wrong and what
would be valid, so that a user can open the file at that line and fix it without guessing.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_PROBLEMS = 20


@dataclass(frozen=True)
class DataProblem:
    """One problem in a data source.

    ``line`` is the 1-based line of a JSON-lines file or of the record's start in a ``.json`` list, the 1-based
    row of a parquet file or saved dataset, or ``None`` for a problem with the whole file (empty, missing).
    """

    path: str
    line: int | None
    field: str
    message: str
    valid: str = ""

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        text = f"{where}: {self.field}: {self.message}"
        return f"{text} (valid: {self.valid})" if self.valid else text


class DataValidationError(ValueError):
    """Raised when training data is malformed; ``.problems`` lists every problem found (at most 20)."""

    def __init__(self, problems: list[DataProblem], truncated: bool = False):
        self.problems = list(problems)
        self.truncated = truncated
        super().__init__(self._text())

    def __reduce__(self):  # keep .problems when pickled (errors raised in datasets.map worker processes)
        return (self.__class__, (self.problems, self.truncated))

    def _text(self) -> str:
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in the training data"
        if self.truncated:
            head += f" (stopped after the first {MAX_PROBLEMS}; fix these and run again to see more)"
        head += " (lines are 1-based; for parquet files and saved datasets they are rows):"
        return "\n".join([head, *(f"  {p}" for p in self.problems)])


class ProblemCollector:
    """Collects problems up to ``MAX_PROBLEMS``; ``full`` tells the reader to stop."""

    def __init__(self, limit: int = MAX_PROBLEMS):
        self.limit = limit
        self.problems: list[DataProblem] = []
        self.truncated = False

    @property
    def full(self) -> bool:
        return len(self.problems) >= self.limit

    def add(self, problem: DataProblem) -> None:
        if self.full:
            self.truncated = True
            return
        self.problems.append(problem)

    def raise_if_any(self) -> None:
        if self.problems:
            raise DataValidationError(self.problems, truncated=self.truncated)
