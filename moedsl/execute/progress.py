"""Progress display for a run: a rich bar over layers with tokens/s, and warnings that never go unseen."""

from __future__ import annotations

import contextlib

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn


class Progress:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.console = Console(stderr=True)

    def warn(self, message: str) -> None:
        # warnings are printed even without progress bars: nothing is skipped silently
        self.console.print(f"[yellow]warning:[/yellow] {message}", highlight=False)

    def note(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False)

    @contextlib.contextmanager
    def layers(self, total: int, start: int):
        if not self.enabled:
            yield _NoBar()
            return
        bar = RichProgress(TextColumn("[bold]layers"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                           TimeElapsedColumn(), console=self.console, transient=False)
        with bar:
            task = bar.add_task("layers", total=total, completed=start, rate="")
            yield _Bar(bar, task)


class _Bar:
    def __init__(self, bar, task):
        self.bar, self.task = bar, task

    def advance(self, i: int, seconds: float, tokens: int) -> None:
        self.bar.update(self.task, advance=1, rate=f"layer {i}: {tokens / max(seconds, 1e-9):,.0f} tokens/s")


class _NoBar:
    def advance(self, i: int, seconds: float, tokens: int) -> None:
        pass
