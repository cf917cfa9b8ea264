"""`moedsl` command lines as real processes, without paying for Python's start and imports each time.

A test that runs `python -m moedsl ...` pays 3-5 s of CPU (20 s of wall time on a busy 2-core
machine) importing torch, transformers and moedsl before the command does anything, and the
adversarial harness alone runs over a hundred commands. Here a server process imports all of that
once (`tests/cli_preload.py`) and forks one process per command. Each command is still a process of
its own: its own argv (`moedsl/__main__.py` is run with `runpy`, as `python -m moedsl` runs it), its
own environment, working directory, stdout and stderr files and exit status (an uncaught exception
prints its traceback and exits 1; `sys.exit` works as usual), and signals (a test may SIGKILL it).

What the server skips is only the interpreter starting and the imports themselves. The tests of the
CLI itself, the wheel test and a handful of adversarial cases still run `python -m moedsl` in a fresh
interpreter, and `MOEDSL_LONG_TESTS=1` (or `MOEDSL_TESTS_FRESH_PYTHON=1`) makes every command do so.

The server (`python -m tests.cli_process SOCKET`) answers each connection with a supervisor process
that forks the command, sends back its pid, waits for it and sends back its exit status (negative:
the signal that ended it) and CPU time. It exits when the test process that started it closes its stdin.
"""

from __future__ import annotations

import atexit
import functools
import os
import pickle
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def fresh_python() -> bool:
    """Whether every command runs as `python -m moedsl` in a fresh interpreter (the slow, exact way)."""
    from tests.long_tests import LONG

    return LONG or os.environ.get("MOEDSL_TESTS_FRESH_PYTHON") == "1"


# ---- the server side ---------------------------------------------------------------------------


def _recv_message(conn: socket.socket) -> bytes:
    size = int.from_bytes(_recv_exactly(conn, 8), "little")
    return _recv_exactly(conn, size)


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError("the connection closed early")
        data += chunk
    return data


def _become_command(request: dict, default_threads: int) -> None:
    """In the forked command process: `cd CWD; env -i ENV python -m moedsl ARGV <NULL >STDOUT 2>STDERR`."""
    code = 1
    try:
        import io
        import runpy
        import traceback

        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                                (1, request["stdout"] or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, request["stderr"] or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            target = os.open(path, flags, 0o644)
            os.dup2(target, fd)
            os.close(target)
        # what the interpreter makes of fds 0, 1, 2 when they are files
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8")
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                                      line_buffering=True)
        import torch

        threads = request["env"].get("OMP_NUM_THREADS")
        torch.set_num_threads(int(threads) if threads and threads.isdigit() else default_threads)
        if request["preexec_fn"] is not None:
            request["preexec_fn"]()
        sys.argv = ["moedsl", *request["argv"]]
        try:
            runpy.run_module("moedsl", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:  # what the interpreter makes of it
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code & 0xFF
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001 - an uncaught exception, as `python -m moedsl` shows it
            traceback.print_exc()
            code = 1
        threading._shutdown()  # the interpreter waits for non-daemon threads before it exits
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _supervise(conn: socket.socket, default_threads: int) -> None:
    """In the supervisor process: read the request, fork the command, report its pid and exit status."""
    try:
        request = pickle.loads(_recv_message(conn))
        pid = os.fork()
        if pid == 0:
            conn.close()
            _become_command(request, default_threads)
        conn.sendall(f"{pid}\n".encode())
        _, status, usage = os.wait4(pid, 0)
        conn.sendall(f"{os.waitstatus_to_exitcode(status)} {usage.ru_utime + usage.ru_stime:.3f}\n".encode())
    finally:
        os._exit(0)


def serve(path: str) -> None:
    import torch

    import tests.cli_preload  # noqa: F401 - the point of the server

    default_threads = torch.get_num_threads()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    supervisors = 0
    while True:
        ready, _, _ = select.select([listener, sys.stdin], [], [], 0.5)
        while supervisors and os.waitpid(-1, os.WNOHANG)[0]:  # reaped here, so their CPU time counts for the tests
            supervisors -= 1
        if sys.stdin in ready:
            break  # the test process is done (or gone): so is the server
        if listener in ready:
            conn, _ = listener.accept()
            if os.fork() == 0:
                listener.close()
                _supervise(conn, default_threads)
            supervisors += 1
            conn.close()
    while supervisors:  # commands still running finish (a test that killed its own has waited already)
        os.waitpid(-1, 0)
        supervisors -= 1


# ---- the test side ---------------------------------------------------------------------------------


class _Server:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="moedsl-cli-server-")
        self.path = os.path.join(self.dir, "socket")
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.cli_process", self.path], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = self.proc.stdout.readline()
        if line != b"ready\n":
            raise RuntimeError(f"the CLI process server did not start (exit {self.proc.wait()})")
        atexit.register(self.close)

    def close(self) -> None:
        """Stop the server (it waits for commands still running) and remove its socket."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def connect(self) -> socket.socket:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.path)
        return conn


_lock = threading.Lock()
cpu_seconds = 0.0  # CPU time of the finished commands so far (they are not this process's children)
_server: _Server | None = None
_server_pid: int | None = None


def _count_cpu(seconds: float) -> None:
    global cpu_seconds
    with _lock:
        cpu_seconds += seconds


def _the_server() -> _Server:
    global _server, _server_pid
    with _lock:
        if _server is None or _server_pid != os.getpid() or _server.proc.poll() is not None:
            _server, _server_pid = _Server(), os.getpid()
        return _server


class Process:
    """A started `moedsl ARGV`, with `pid`, `poll()`, `wait(timeout)` and `kill()` like `subprocess.Popen`."""

    def __init__(self, argv: list[str], cwd: Path | str, env: dict, stdout: Path | str | None = None,
                 stderr: Path | str | None = None, preexec_fn=None):
        self.argv = ["moedsl", *argv]
        self.returncode: int | None = None
        if fresh_python():
            files = [open(p, "w") if p else subprocess.DEVNULL for p in (stdout, stderr)]
            self._popen = subprocess.Popen([sys.executable, "-m", "moedsl", *argv], cwd=cwd, env=env,
                                           stdout=files[0], stderr=files[1], preexec_fn=preexec_fn)
            for f in files:
                if f is not subprocess.DEVNULL:
                    f.close()
            self.pid = self._popen.pid
            return
        self._popen = None
        request = {"argv": list(argv), "cwd": str(cwd), "env": dict(env), "stdout": str(stdout) if stdout else None,
                   "stderr": str(stderr) if stderr else None, "preexec_fn": preexec_fn}
        message = pickle.dumps(request)
        self._conn = _the_server().connect()
        self._conn.sendall(len(message).to_bytes(8, "little") + message)
        self._buf = b""
        self.pid = int(self._line(None))

    def _line(self, timeout: float | None) -> str | None:
        """The next line from the supervisor; None if none came within `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._conn], [], [], left)
            if not ready:
                return None
            chunk = self._conn.recv(64)
            if not chunk:
                raise RuntimeError(f"the CLI process server lost {' '.join(self.argv)}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def poll(self) -> int | None:
        if self._popen is not None:
            return self._popen.poll()
        if self.returncode is None and (b"\n" in self._buf or select.select([self._conn], [], [], 0)[0]):
            self.wait()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self._popen is not None:
            return self._popen.wait(timeout)
        if self.returncode is None:
            line = self._line(timeout)
            if line is None:
                raise subprocess.TimeoutExpired(self.argv, timeout)
            code, cpu = line.split()
            self.returncode = int(code)
            self._conn.close()
            _count_cpu(float(cpu))
        return self.returncode

    def kill(self) -> None:
        if self._popen is not None:
            self._popen.kill()
        elif self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _limit_file_size(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def file_size_limit(limit: int):
    """A `preexec_fn`: the command may write no file larger than `limit` bytes (RLIMIT_FSIZE)."""
    return functools.partial(_limit_file_size, limit)


@dataclass
class Completed:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run(argv: list[str], cwd: Path | str, env: dict, timeout: float = 300, preexec_fn=None) -> Completed:
    """`moedsl ARGV` to its end, like `subprocess.run(..., capture_output=True, text=True)`; after `timeout`
    seconds the process is killed and `subprocess.TimeoutExpired` raised (its `stderr`: what it wrote)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moedsl-cli-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        p = Process(argv, cwd, env, out, err, preexec_fn)
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            p.kill()
            p.wait()
            exc.stderr = err.read_text(errors="replace") if err.exists() else ""
            raise
        read = lambda f: f.read_text(errors="replace") if f.exists() else ""  # noqa: E731
        return Completed(rc, read(out), read(err), time.perf_counter() - t0)


if __name__ == "__main__":
    serve(sys.argv[1])
    sys.stdout.flush()
    os._exit(0)  # no finalizing of torch and transformers: seconds of CPU on a busy machine, for nothing
