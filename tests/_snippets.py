"""Run code snippets as ``python -c CODE`` would, each in a process of its own, without
paying the imports every time.

A server process imports torch, transformers, timm, open_clip and unipeft once; for each
snippet it forks a child, which runs the code in a fresh ``__main__`` namespace with its
stdout and stderr sent to a file, and exits with 1 (and the traceback on stderr) if the code
raised. A forgotten import still fails (the snippet's names are its own), and nothing one
snippet does reaches the next (each child starts from the server's untouched state); only
the import time is shared. Used by the documentation tests, where the imports were most of
each example's time.
"""

from __future__ import annotations

import atexit
import os
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass

_SERVER = r"""
import os, struct, sys, traceback
import torch, transformers, timm, open_clip
import unipeft
unipeft.list_methods()  # the registry, loaded as a fresh interpreter's first call would

def child(code, out):
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.argv = ["-c"]
    try:
        namespace = {"__name__": "__main__", "__builtins__": __builtins__}
        exec(compile(code, "<string>", "exec"), namespace)
    except SystemExit as exc:
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(exc.code if isinstance(exc.code, int) else 1)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)

src, dst = sys.stdin.buffer, sys.stdout.buffer
while True:
    head = src.read(8)
    if len(head) < 8:
        break
    code = src.read(struct.unpack("<Q", head)[0]).decode()
    out = src.readline().decode().rstrip("\n")
    pid = os.fork()
    if pid == 0:
        child(code, out)
    _, status = os.waitpid(pid, 0)
    dst.write(struct.pack("<q", os.waitstatus_to_exitcode(status)))
    dst.flush()
"""


@dataclass
class Result:
    returncode: int
    output: str


class SnippetRunner:
    """One server per test process, started on first use, stopped at exit."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None

    def _server(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            atexit.register(self.close)
        return self._proc

    def run(self, code: str) -> Result:
        proc = self._server()
        assert proc.stdin is not None and proc.stdout is not None
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "output.txt")
            data = code.encode()
            proc.stdin.write(struct.pack("<Q", len(data)) + data + out.encode() + b"\n")
            proc.stdin.flush()
            head = proc.stdout.read(8)
            if len(head) < 8:
                raise RuntimeError("the snippet server stopped; run the snippet alone to see why")
            code_ = struct.unpack("<q", head)[0]
            text = (
                open(out, encoding="utf-8", errors="replace").read() if os.path.exists(out) else ""
            )
        return Result(code_, text)

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            self._proc.wait(timeout=30)


RUNNER = SnippetRunner()
