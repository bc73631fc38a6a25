"""COLMAP models read on other processes, for ingest of many large models: reading is
partly Python, which holds the GIL, so reading threads would only take turns with the
thread that writes the store.

Each worker is ``python -m sfmpairs.sfm_io.read_workers``: a fresh interpreter, so
nothing of the caller's script runs in it (unlike multiprocessing's spawn, which
re-imports the caller's ``__main__``). It reads requests from its stdin and writes
answers to its stdout, both pickled; it ignores SIGINT (Ctrl-C reaches the whole process
group, and the caller handles it), and it exits at the end of its stdin: when the
caller closes it or dies, even by SIGKILL.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import traceback

from sfmpairs.common import SfmpairsError


class Worker:
    """One reading process, one request at a time."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.path = None

    def send(self, path, fmt: str, reader: str) -> None:
        self.path = path
        try:
            pickle.dump((path, fmt, reader), self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.died()

    def receive(self):
        """The model asked for last; its reader's error as it was raised."""
        try:
            ok, value = pickle.load(self.proc.stdout)
        except (EOFError, pickle.UnpicklingError):
            self.died()
        if not ok:
            raise value
        return value

    def died(self):
        code = self.proc.wait()
        raise SfmpairsError(f"{self.path}: the process reading it died (exit code {code}; out of memory?)")

    def close(self, wait: bool) -> None:
        """End the process: at the end of its stdin after its last answer (``wait``), or now."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        if not wait:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()


def read_models(sources: list, reader: str, processes: int):
    """Each source's model (``read_model(source.path, source.format, reader)``) in
    order, read on ``processes`` workers, each reading its next model while the caller
    uses the last one; the workers end with the iteration (killed where it stops early)."""
    workers = [Worker() for _ in range(min(processes, len(sources)))]
    done = False
    try:
        for k, w in enumerate(workers):
            w.send(sources[k].path, sources[k].format, reader)
        for k in range(len(sources)):
            w = workers[k % len(workers)]
            model = w.receive()
            if k + len(workers) < len(sources):
                nxt = sources[k + len(workers)]
                w.send(nxt.path, nxt.format, reader)
            yield model
            del model
        done = True
    finally:
        for w in workers:
            w.close(wait=done)


def main() -> None:
    """The worker: requests from stdin, answers to stdout, until stdin ends."""
    from sfmpairs.sfm_io.ingest import read_model

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed by the libraries goes to stderr, not into the answers
    requests = sys.stdin.buffer
    while True:
        try:
            path, fmt, reader = pickle.load(requests)
        except EOFError:
            return
        try:
            answer = (True, read_model(path, fmt, reader))
        except SfmpairsError as e:
            answer = (False, e)
        except Exception:  # a bug: its traceback, as the caller's own would be
            answer = (False, RuntimeError(f"reading {path} failed:\n{traceback.format_exc()}"))
        try:
            pickle.dump(answer, answers, protocol=pickle.HIGHEST_PROTOCOL)
            answers.flush()
        except BrokenPipeError:  # the caller is gone
            return


if __name__ == "__main__":
    main()
