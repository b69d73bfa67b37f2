"""Progress output: a tqdm bar on a terminal, a line every few seconds in a log file.

tqdm redraws its bar in place with carriage returns; written to a file or a pipe (a
``make demo`` log, a cluster job's output) every redraw becomes a line of its own. So on
a non-terminal stream this prints one plain line every ``PROGRESS_SECONDS`` (and at the
end) with the position, the speed over that stretch and the latest mean losses.
"""

from __future__ import annotations

import sys
import time

PROGRESS_SECONDS = 10.0  # between two lines in a non-interactive log


class Progress:
    """update(n) after each step; set_losses({name: value}) when losses are read back; close()."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", unit: str = "it", enabled: bool = True,
                 stream=None, interactive: bool | None = None, min_seconds: float = PROGRESS_SECONDS,
                 clock=time.perf_counter):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.interactive = interactive if interactive is not None else bool(
            getattr(self.stream, "isatty", lambda: False)())
        self.total, self.position, self.desc, self.unit = total, initial, desc, unit
        self.min_seconds, self.clock = min_seconds, clock
        self.losses: dict = {}
        self.bar = None
        self._line_time, self._line_position = clock(), initial
        if enabled and self.interactive:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                            file=self.stream)

    def set_total(self, total: int) -> None:
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def set_losses(self, losses: dict) -> None:
        self.losses = dict(losses)
        if self.bar is not None:
            self.bar.set_postfix({n.removeprefix("loss_"): f"{v:.3f}" for n, v in losses.items()}, refresh=False)

    def update(self, n: int = 1) -> None:
        self.position += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and self.clock() - self._line_time >= self.min_seconds:
            self._write_line()

    def _write_line(self) -> None:
        now = self.clock()
        elapsed = now - self._line_time
        rate = (self.position - self._line_position) / elapsed if elapsed > 0 else float("nan")
        percent = f" ({100 * self.position / self.total:.0f}%)" if self.total else ""
        losses = "".join(f" {n.removeprefix('loss_')} {v:.3f}" for n, v in self.losses.items())
        total_loss = f" loss {sum(self.losses.values()):.3f}" if self.losses else ""
        print(f"{self.desc} {self.position}/{self.total}{percent} {rate:.2f} {self.unit}/s{total_loss}{losses}",
              file=self.stream, flush=True)
        self._line_time, self._line_position = now, self.position

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.position != self._line_position:
            self._write_line()  # the last stretch, so a log always ends with the final position
        self.enabled = False


__all__ = ["PROGRESS_SECONDS", "Progress"]
