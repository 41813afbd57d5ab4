"""What the driver's console shows: raydrive's own lines, one progress bar, and errors.

Ray is loud: every training worker, Ray Train's controller and each Ray Data task print their own
logs, which Ray forwards to the driver. By default all of that goes to `<run folder>/ray.log`
instead (`--verbose` shows it on the console as well), and the console shows:

- the driver's own `[raydrive]` lines (resolved config summary, where things are written, results);
- a progress bar drawn on the driver from what rank 0 sends to a small actor (`ProgressBoard`):
  step/total, epoch, loss, samples/s, data-wait share, ETA; a plain line every 30 s where the
  console is not a terminal (log files, `ray job logs`);
- the messages rank 0 meant for a person (evaluation results, resume notes), through the same actor;
- failures: the driver prints them itself from what `fit()` raises (`raydrive/launch/train.py`).

Routing the forwarded output uses Ray's stdstream dispatcher (`ray._private.worker`), the hook its
own `log_to_driver` printing hangs on; Ray 2.60 offers no public switch for "to a file".
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

RAY_LOG = "ray.log"
_RAY_HANDLER = "ray_print_logs"  # the name Ray registers its console printer under
_OUR_HANDLER = "raydrive_ray_log"


class _Sink:
    """Where Ray's lines go: held in memory until the run folder is in use (a run refused before it
    starts leaves no file behind), then appended to the log file. A disk that cannot take them loses
    them, never the run."""

    def __init__(self, path: Path):
        self.path, self.file, self.buffer = path, None, []

    def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (closed by close())
            self.file.write("".join(self.buffer))
        except OSError as e:
            print(f"[raydrive] cannot write {self.path} ({e.strerror or e}); Ray's output for this run is lost")
        self.buffer = None

    def write(self, text: str) -> None:
        if self.buffer is not None:
            self.buffer.append(text)
        elif self.file is not None:
            try:
                self.file.write(text)
            except (OSError, ValueError):
                pass

    def flush(self) -> None:
        pass  # line-buffered

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        self.buffer = None


class RayOutput:
    """Sends Ray's output (forwarded worker lines, the driver's `ray` loggers, Python warnings) to a
    log file; with `verbose` the console keeps it too. A context manager; restores everything on exit.
    `open_log()` starts the file once the run folder is in use; until then the lines wait in memory."""

    def __init__(self, path: Path, verbose: bool = False):
        self.path, self.verbose = Path(path), verbose
        self._file = _Sink(self.path)
        self._saved: list[tuple[logging.Logger, list[logging.Handler], bool]] = []
        self._handler: logging.Handler | None = None
        self._removed_printer = None

    def __enter__(self) -> RayOutput:
        self._file.write(f"===== raydrive run started {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n")
        import ray  # noqa: F401 (importing Ray installs its console handler, which quiet_loggers replaces)

        self.quiet_loggers()
        return self

    def open_log(self) -> None:
        self._file.open()

    def quiet_loggers(self) -> None:
        """Send the driver's `ray` records (and Python warnings) to the file: quiet, they propagate to a file
        handler on the root logger in place of Ray's console handler; verbose, the file handler sits beside
        it. Called again after `ray.init`, which replaces the `ray` logger's handlers."""
        if self._handler is None:
            self._handler = logging.StreamHandler(self._file)
            self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        ray_logger = logging.getLogger("ray")
        if not self._saved:
            self._saved = [(ray_logger, list(ray_logger.handlers), ray_logger.propagate)]
        if self.verbose:
            if self._handler not in ray_logger.handlers:
                ray_logger.addHandler(self._handler)
            return
        for h in list(ray_logger.handlers):
            ray_logger.removeHandler(h)
        ray_logger.propagate = True
        root = logging.getLogger()
        if self._handler not in root.handlers:
            root.addHandler(self._handler)
            self._saved.append((root, list(root.handlers[:-1]), root.propagate))
        logging.captureWarnings(True)

    def capture_workers(self) -> None:
        """After `ray.init`: forwarded worker / actor / task output goes to the file (and, verbose, on)."""
        try:
            from ray._private import worker as ray_worker

            dispatcher = ray_worker.global_worker_stdstream_dispatcher
        except (ImportError, AttributeError):  # another Ray: leave its printing as it is
            return
        dispatcher.remove_handler(_OUR_HANDLER)
        dispatcher.add_handler(_OUR_HANDLER, self._write_batch)
        if not self.verbose:
            printer = [pair for pair in dispatcher.handlers if pair[0] == _RAY_HANDLER]
            if printer:
                self._removed_printer = printer[0]
                dispatcher.remove_handler(_RAY_HANDLER)

    def _write_batch(self, data: dict) -> None:
        who = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({who} pid={data.get('pid')}, ip={data.get('ip')})"
        self._file.write("".join(f"{prefix} {line}\n" for line in data.get("lines", [])))

    def __exit__(self, *exc) -> None:
        try:
            from ray._private import worker as ray_worker

            dispatcher = ray_worker.global_worker_stdstream_dispatcher
            dispatcher.remove_handler(_OUR_HANDLER)
            if self._removed_printer is not None:
                dispatcher.handlers.append(self._removed_printer)
        except (ImportError, AttributeError):
            pass
        for logger, handlers, propagate in self._saved:
            for h in list(logger.handlers):
                logger.removeHandler(h)
            for h in handlers:
                logger.addHandler(h)
            logger.propagate = propagate
        logging.captureWarnings(False)
        self._file.close()


def _board_class():
    import ray

    @ray.remote(num_cpus=0, max_restarts=0)
    class ProgressBoard:
        """What rank 0 tells the driver's console: the newest progress fields and messages in order.
        Zero CPUs, so it never takes a slot that training or Ray Data asked for."""

        def __init__(self):
            self.fields: dict = {}
            self.messages: list[str] = []

        def update(self, fields: dict) -> None:
            self.fields.update(fields)

        def message(self, text: str) -> None:
            self.messages.append(text)

        def drain(self) -> tuple[dict, list[str]]:
            out, self.messages = self.messages, []
            return dict(self.fields), out

    return ProgressBoard


def _board_on_this_node():
    """The board lives on the driver's node: a node lost mid-run must not take the console with it
    (rank 0's resume note would go nowhere)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return _board_class().options(scheduling_strategy=here).remote()


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def postfix(fields: dict) -> str:
    """The bar's right-hand side: epoch, loss, throughput, data-wait share (or what is going on)."""
    phase = fields.get("phase")
    if phase and phase != "training":
        return phase
    parts = []
    if "epoch" in fields:
        parts.append(f"epoch {fields['epoch']}")
    if "loss" in fields:
        parts.append(f"loss {fields['loss']:.3f}")
    if "samples_per_s" in fields:
        parts.append(f"{fields['samples_per_s']:.2f} samples/s")
    if "data_wait" in fields:
        parts.append(f"data wait {fields['data_wait']:.0%}")
    return " ".join(parts)


class ProgressConsole:
    """The driver's side of the board: a thread that polls it and draws the bar (tqdm on a terminal,
    a plain line every `line_every` seconds elsewhere) and prints rank 0's messages above it."""

    def __init__(self, title: str, total: int, stream=None, line_every: float = 30.0, poll: float = 0.5):
        self.title, self.total = title, total
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.line_every, self.poll = line_every, poll
        self.board = _board_on_this_node()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None
        self._fields: dict = {}
        self._last_line = 0.0
        self._last_text = ""
        self._rate: list[tuple[float, int]] = []  # (time, step) samples for the ETA of plain lines

    def __enter__(self) -> ProgressConsole:
        self._thread = threading.Thread(target=self._run, name="raydrive-progress", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            self.refresh()

    def refresh(self, final: bool = False) -> None:
        import ray

        try:
            fields, messages = ray.get(self.board.drain.remote(), timeout=10)
        except Exception:  # noqa: BLE001 (the board is a convenience; the run's own result decides)
            return
        for text in messages:
            self._write(text)
        if fields:
            self._fields = fields
            self._draw(final)

    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def _draw(self, final: bool) -> None:
        f = self._fields
        step, total = int(f.get("step", 0)), int(f.get("total", self.total) or self.total)
        if self.tty:
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(
                    total=total, initial=step, desc=self.title, unit="step", file=self.stream, dynamic_ncols=True
                )
            self._bar.total = total
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(postfix(f), refresh=True)
            return
        now = time.monotonic()
        self._rate.append((now, step))
        self._rate = [r for r in self._rate if now - r[0] <= 300] or [(now, step)]
        if not final and now - self._last_line < self.line_every:
            return
        self._last_line = now
        (t0, s0), eta = self._rate[0], ""
        if step > s0 and now > t0 and step < total:
            eta = f" ETA {format_eta((total - step) * (now - t0) / (step - s0))}"
        pct = f"{100 * step / total:.0f}%" if total else "?"
        line = f"[raydrive] {self.title} step {step}/{total} ({pct}) {postfix(f)}{eta}"
        if line != self._last_text:  # nothing new since the last line (e.g. a long evaluation)
            print(line, file=self.stream, flush=True)
            self._last_text = line

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        self.refresh(final=True)  # what rank 0 sent last (its final messages) before the driver reports
        if self._bar is not None:
            self._bar.close()
        try:
            import ray

            ray.kill(self.board)
        except Exception:  # noqa: BLE001
            pass
