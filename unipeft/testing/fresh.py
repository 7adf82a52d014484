"""A fresh Python interpreter that loads saved adapters: one per process, started on first use.

The ``fresh_interpreter_load`` invariant saves adapters in this process and asks another
interpreter, which never saw the model, to load them onto a new tiny backbone and run it.
State that lives only in the saving process (a random projection drawn from an unseeded
generator and kept out of the file, a class-level cache, a buffer registered with
``persistent=False``) then shows up as different outputs.

Starting an interpreter and importing torch costs seconds, so there is one worker per
process: ``python -c`` run with ``subprocess`` (it inherits only the environment and
``sys.path``, and never imports the caller's ``__main__``, so a script without a
``__name__ == "__main__"`` guard can use it), started when first needed and reused by every
case, stopped when the process exits. Requests and answers are pickled over its stdin and
stdout; what the worker prints goes to stderr. Each
request names the method (its :class:`~unipeft.Method` record, pickled by reference when it
can be, else only its id, for the worker's own registry to resolve), the tiny backbone (by
registry name, or pickled) and the folder. Before each load the worker reseeds torch's
global generator with a fresh random seed, as a user's program may have drawn any number of
random numbers before loading, and uses as many threads as this process, so that outputs
are comparable bit for bit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import select
import subprocess
import sys
import threading
import traceback
from typing import Any, BinaryIO

import torch
from torch import Tensor

from ..contract.method import Method
from ..maps.tiny import TinyBackbone

_TIMEOUT_S = 300.0
_LOCK = threading.Lock()
_WORKER: dict[str, Any] = {}
_BOOT = "import sys; sys.path[:0] = {path!r}; from unipeft.testing.fresh import _main; _main()"


class FreshInterpreterError(RuntimeError):
    """The fresh interpreter could not load or run the adapters."""


def _blob(obj: object) -> bytes | None:
    try:
        return pickle.dumps(obj)
    except Exception:  # lambdas, local classes: the worker resolves the name instead
        return None


def fresh_outputs(
    method: Method, bb: TinyBackbone, directory: str, seeds: tuple[int, ...] = (0,)
) -> list[Tensor]:
    """Outputs of ``unipeft.load(bb.make(), directory)`` run on ``bb.sample(seed)`` for each
    seed, computed in the fresh interpreter. Raises :class:`FreshInterpreterError` with the
    worker's traceback when it fails there."""
    request = (
        _blob(method),
        method.id,
        _blob(bb),
        bb.name,
        os.fspath(directory),
        tuple(seeds),
    )
    with _LOCK:
        status, payload = _ask(request)
    if status != "ok":
        raise FreshInterpreterError(payload)
    return payload


def _ask(request: tuple) -> tuple[str, Any]:
    proc = _process()
    try:
        pickle.dump(request, proc.stdin)
        proc.stdin.flush()
        if hasattr(select, "poll"):
            ready, _, _ = select.select([proc.stdout], [], [], _TIMEOUT_S)
            if not ready:
                raise TimeoutError(f"no answer from the fresh interpreter in {_TIMEOUT_S:.0f} s")
        return pickle.load(proc.stdout)
    except (EOFError, OSError, TimeoutError, pickle.UnpicklingError) as exc:
        stop()
        return "error", f"the fresh interpreter died or hung: {type(exc).__name__}: {exc}"


def _process() -> subprocess.Popen:
    proc = _WORKER.get("process")
    if proc is not None and proc.poll() is None:
        return proc
    path = [p for p in sys.path if isinstance(p, str)]
    proc = subprocess.Popen(
        [sys.executable, "-c", _BOOT.format(path=path), str(torch.get_num_threads())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    _WORKER["process"] = proc
    return proc


def stop() -> None:
    """Stop the worker (it is started again when next needed)."""
    proc = _WORKER.pop("process", None)
    if proc is None:
        return
    with contextlib.suppress(Exception):
        proc.stdin.close()  # the worker ends on end of input
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    with contextlib.suppress(Exception):
        proc.stdout.close()


atexit.register(stop)


# ------------------------------------------------------------------ in the worker


def _main() -> None:  # pragma: no cover - runs in the worker
    """The worker's loop: requests from stdin, answers to stdout, prints to stderr."""
    answers: BinaryIO = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    requests = sys.stdin.buffer
    torch.set_num_threads(int(sys.argv[1]))
    while True:
        try:
            request = pickle.load(requests)
        except EOFError:
            return
        try:
            answer: tuple[str, Any] = ("ok", _load_and_run(*request))
        except BaseException as exc:
            answer = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        pickle.dump(answer, answers)
        answers.flush()


def _load_and_run(
    method_blob: bytes | None,
    method_id: str,
    bb_blob: bytes | None,
    bb_name: str,
    directory: str,
    seeds: tuple[int, ...],
) -> list[Tensor]:  # pragma: no cover - runs in the worker
    import unipeft
    from unipeft.runtime.registry import registry

    reg = registry()
    methods = reg.methods
    previous = methods.get(method_id)
    if method_blob is not None:
        methods[method_id] = pickle.loads(method_blob)
    elif previous is None:
        raise FreshInterpreterError(
            f"method {method_id!r} is unknown in a fresh interpreter: no installed plugin "
            "registers it, and its Method record cannot be pickled (define its functions "
            "and config class at module level)"
        )
    try:
        if bb_blob is not None:
            bb = pickle.loads(bb_blob)
        else:
            bb = reg.tiny_backbone(bb_name)
        torch.manual_seed(int.from_bytes(os.urandom(8), "little") % (2**63))
        model = unipeft.load(bb.make(), directory).eval()
        with torch.no_grad():
            return [bb.run(model, bb.sample(seed)) for seed in seeds]
    finally:
        if previous is None:
            methods.pop(method_id, None)
        else:
            methods[method_id] = previous
