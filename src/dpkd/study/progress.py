"""The parent's view of a running study: one progress bar per running stage, and the study's log lines."""

from __future__ import annotations

import time
from typing import Any, TextIO


class ProgressBoard:
    """Writes the log lines to `log` and draws the bars on `bars` (None: no bars).

    `stages` are numbered in the order given, `[i/n]` with n counting the report that follows them.
    """

    def __init__(self, stages: list, log: TextIO, bars: TextIO | None = None):
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.log = log
        self.bars_to = bars
        self.number = {s.name: f"[{i}/{len(stages) + 1}]" for i, s in enumerate(stages, 1)}
        self.title = {s.name: s.title for s in stages}
        self.bars: dict[str, Any] = {}
        self.started: dict[str, float] = {}
        self.last_refresh = 0.0

    def write(self, text: str) -> None:
        with self._tqdm.external_write_mode(file=self.log):
            self.log.write(text + "\n")

    def start(self, name: str) -> None:
        self.started[name] = time.perf_counter()
        self.write(f"{self.number[name]} {self.title[name]} ...")
        self.bars[name] = self._tqdm(desc=f"{self.number[name]} {name}", total=None, leave=False,
                                     bar_format="{desc}: {elapsed}", dynamic_ncols=True, file=self.bars_to,
                                     disable=self.bars_to is None)

    def receive(self, kind: str, name: str, value) -> None:
        """A message from a running stage: a log line (`note`) or its training progress."""
        bar = self.bars.get(name)
        if kind == "note":
            self.write(value)
        elif bar is None:
            return
        elif kind == "total":
            bar.reset(total=value)
            bar.bar_format = None
        elif kind == "step":
            bar.update(value - bar.n)
        elif kind == "loss":
            bar.set_postfix(loss=f"{value:.3f}", refresh=False)

    def tick(self) -> None:
        """Keep the elapsed times moving, about once a second."""
        now = time.perf_counter()
        if now - self.last_refresh >= 1.0:
            self.last_refresh = now
            for bar in self.bars.values():
                bar.refresh()

    def finish(self, name: str) -> float:
        seconds = time.perf_counter() - self.started.pop(name)
        self.bars.pop(name).close()
        self.write(f"{self.number[name]} {self.title[name]}: {seconds:.0f}s")
        return seconds

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
