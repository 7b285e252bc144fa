"""Start the training process(es) for the train stage and follow them.

One process: `python -m sovllm.train.worker PLAN`. Several (`train.num_processes` > 1):
`python -m torch.distributed.run --standalone --nproc-per-node N -m sovllm.train.worker PLAN`
(torchrun; its rendezvous listens on loopback). The stage's process only reads events: rank 0's
log lines go to the stage's log, its progress to the stage's bar, its result into the stage
manifest, and its error is raised again here as the same sovllm error. Everything else the
processes print is passed through to stderr; when they fail without an error event, the error
names the exit status and their last lines. Interrupting the stage stops them; killing it kills
them (PR_SET_PDEATHSIG), so a re-run never races a leftover process for the checkpoints.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

from sovllm import errors
from sovllm.artifacts import write_atomic
from sovllm.procs import dies_with_parent
from sovllm.train.hardware import Hardware
from sovllm.train.worker import EVENT

PLAN = ".train-plan.json"


def command(plan: Path, hardware: Hardware) -> list[str]:
    """The command that runs training as `hardware` lays it out."""
    worker = ["-m", "sovllm.train.worker", str(plan)]
    if hardware.processes == 1:
        return [sys.executable, *worker]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={hardware.processes}",
            "--max-restarts=0", *worker]


def _reraise(event: dict) -> errors.SovllmError:
    cls = getattr(errors, event.get("type") or "", None)
    if not (isinstance(cls, type) and issubclass(cls, errors.SovllmError)):
        cls = errors.SovllmError
    error = cls.__new__(cls)
    errors.SovllmError.__init__(error, event.get("message") or "training failed", hint=event.get("hint"))
    error.problems = []
    return error


def run(plan: dict, out_dir: Path, hardware: Hardware, *, log: Callable[[str], None] = print,
        progress_factory: Callable | None = None) -> dict:
    """Run training as planned; returns rank 0's result event (the stage manifest's fields)."""
    path = out_dir / PLAN
    write_atomic(path, json.dumps(plan, indent=1, default=str) + "\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if hardware.processes > 1 and hardware.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", str(hardware.threads))
    proc = subprocess.Popen(command(path, hardware), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, bufsize=1, preexec_fn=dies_with_parent())
    tail: collections.deque[str] = collections.deque(maxlen=25)

    def pass_stderr() -> None:
        for line in proc.stderr:
            tail.append(line.rstrip("\n"))
            sys.stderr.write(line)

    reader = threading.Thread(target=pass_stderr, daemon=True)
    reader.start()
    result, error, bar = None, None, None
    try:
        for line in proc.stdout:
            if not line.startswith(EVENT):
                tail.append(line.rstrip("\n"))
                sys.stderr.write(line)
                continue
            event = json.loads(line[len(EVENT):])
            kind = event["event"]
            if kind == "log":
                log(event["message"])
            elif kind == "bar" and progress_factory:
                bar = progress_factory(event["total"])
            elif kind == "advance" and bar:
                bar.advance(event.get("item", ""), step=event.get("step", 1))
            elif kind == "bar_close" and bar:
                bar.close()
                bar = None
            elif kind == "result":
                result = event
            elif kind == "error":
                error = event
        code = proc.wait()
    except BaseException:  # interrupted: stop the training processes before going
        proc.send_signal(signal.SIGINT if hardware.processes == 1 else signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    finally:
        if bar:
            bar.close()
        reader.join(timeout=5)
    if error is not None:
        exc = _reraise(error)
        exc.result = result
        raise exc
    if code != 0 or result is None:
        what = f"{hardware.processes} training processes (torchrun)" if hardware.processes > 1 else "the training process"
        last = "\n".join(tail) or "(no output)"
        raise errors.ModelError(f"{what} stopped with exit status {code}; last lines:\n{last}",
                                hint="a re-run resumes from the last checkpoint in out/train/checkpoints")
    return result
