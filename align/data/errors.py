"""Bad-input errors that name the file, the 1-based row, the reason and the fix."""

from __future__ import annotations

from dataclasses import dataclass, field


class RowProblem(ValueError):
    """What is wrong with one row, before we know which file and row it came from."""

    def __init__(self, reason: str, fix: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.fix = fix


class DataError(ValueError):
    """A bad row in a named input. Raised before any training starts."""

    def __init__(self, source: str, row: int | None, reason: str, fix: str = ""):
        self.source, self.row, self.reason, self.fix = source, row, reason, fix
        where = f"{source}, row {row}" if row is not None else source
        msg = f"{where}: {reason}"
        if fix:
            msg += f". Fix: {fix}"
        if row is not None:
            msg += " (or set data.on_error=skip to skip and count bad rows)"
        super().__init__(msg)


@dataclass
class RowErrors:
    """Applies `data.on_error`: 'raise' stops at the first bad row, 'skip' counts and goes on."""

    policy: str = "raise"
    skipped: list[tuple[str, int, str]] = field(default_factory=list)

    def __post_init__(self):
        if self.policy not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be 'raise' or 'skip', got {self.policy!r}")

    def handle(self, source: str, row: int, problem: RowProblem) -> None:
        if self.policy == "raise":
            raise DataError(source, row, problem.reason, problem.fix) from None
        self.skipped.append((source, row, problem.reason))

    def summary(self) -> str:
        if not self.skipped:
            return "no rows skipped"
        head = "; ".join(f"{s} row {r}: {why}" for s, r, why in self.skipped[:3])
        more = f" (+{len(self.skipped) - 3} more)" if len(self.skipped) > 3 else ""
        return f"skipped {len(self.skipped)} bad rows: {head}{more}"
