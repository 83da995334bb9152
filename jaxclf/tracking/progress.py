"""What a person watching a run sees: a compact line per log step and evaluation, a live bar
between them on a terminal, and a word for each quiet phase (listing files, compiling, evaluating).

Drawn with tqdm. Bars appear only where stderr is a terminal (and only on process 0); elsewhere,
e.g. under SLURM or in a log file, the same lines come out plain. Every metric still goes to
metrics.jsonl and TensorBoard (jaxclf.tracking.metrics); the console shows the few that matter.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterable, Iterator

import jax
from tqdm import tqdm

# Shown on a log step's line, in this order, where present (train/ prefix dropped).
TRAIN_KEYS = ("loss", "accuracy", "lr")
# Shown on an evaluation's line, for each evaluated model (val, val_ema).
EVAL_KEYS = ("accuracy", "loss", "top5")


def interactive() -> bool:
    """Whether to draw bars: stderr is a terminal, and this is process 0."""
    return sys.stderr.isatty() and jax.process_index() == 0


def say(text: str) -> None:
    """A timestamped line on stderr from process 0, above any bar being drawn."""
    if jax.process_index() == 0:
        tqdm.write(f"{time.strftime('[%H:%M:%S]')} {text}", file=sys.stderr)


@contextlib.contextmanager
def phase(description: str) -> Iterator[None]:
    """`description...` now and `description: Ns` when the block ends: a quiet phase made visible."""
    start = time.perf_counter()
    say(f"{description} ...")
    yield
    say(f"{description}: {_duration(time.perf_counter() - start)}")


def track(items: Iterable, description: str, total: int | None = None) -> Iterator:
    """`items`, with a transient bar on a terminal (nothing elsewhere)."""
    return iter(bar(description, total, items=items))


def bar(description: str, total: int | None, unit: str = "it", items: Iterable | None = None) -> tqdm:
    """A transient bar on a terminal (a silent counter elsewhere): `.update(n)` it, or iterate it over `items`."""
    return tqdm(items, desc=description, total=total, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True,
                disable=not interactive())


class TrainProgress:
    """The run's step counter: a bar of steps on a terminal, and the compact log and evaluation lines.

    `step()` costs no host sync (a Python counter); the lines come from values the loop already
    read back (TrainLog's window means, evaluation results).
    """

    def __init__(self, total_steps: int, start_step: int, batch_size: int):
        self._total = total_steps
        self._since: tuple[float, int] | None = None  # (time, step) after the first step: ETAs leave compiling out
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", desc="training", leave=False,
                         file=sys.stderr, dynamic_ncols=True, disable=not interactive())

    def step(self) -> None:
        self._bar.update(1)
        if self._since is None:
            self._since = (time.perf_counter(), self._bar.n)

    def log_line(self, step: int, scalars: dict[str, float]) -> None:
        """`step N/TOTAL  P%  img/s  ETA  loss ...` from a log step's window means; the ETA from the
        pace since the first step, evaluations included."""
        rate = scalars.get("train/images_per_sec", 0.0)
        start_time, start_step = self._since or (time.perf_counter(), step)
        elapsed = time.perf_counter() - start_time
        eta = (self._total - step) * elapsed / (step - start_step) if step > start_step else math.nan
        shown = "  ".join(f"{key} {_number(scalars['train/' + key])}" for key in TRAIN_KEYS if "train/" + key in scalars)
        skipped = scalars.get("train/skipped_steps", 0) + scalars.get("data/skipped_images", 0)
        extra = (f"  skipped {int(scalars.get('train/skipped_steps', 0))} steps, "
                 f"{int(scalars.get('data/skipped_images', 0))} images") if skipped else ""
        say(f"step {step}/{self._total} {100 * step / self._total:3.0f}%  {rate:.1f} img/s  "
            f"ETA {_duration(eta)}  {shown}{extra}")

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """An evaluation listener: `eval @ step N: val/accuracy ... val/loss ...`."""
        models = sorted({name.split("/")[0] for name in metrics})
        shown = "  ".join(f"{m}/{key} {_number(metrics[f'{m}/{key}'])}" for m in models for key in EVAL_KEYS
                          if f"{m}/{key}" in metrics)
        say(f"eval @ step {step}: {shown}")

    def close(self) -> None:
        self._bar.close()


def _number(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e-2 and value else f"{value:.4f}" if abs(value) < 10 else f"{value:.4g}"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s" if rest >= 60 else f"{rest}s"
