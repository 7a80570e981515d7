"""Call a function of a module with a hard time bound, in persistent worker processes.

    pool = bounded.Pool("/path/to/mod.py", preload=("sympy",))
    pool.call("fn", [arg, ...], timeout=1.5)   # fn's JSON-able result, or None if it failed or timed out
    python bounded.py /path/to/mod.py sympy    # one worker (the pool starts these itself)

Choices:
- Processes, not threads or SIGALRM in the caller: the bound must hold in any thread and under
  torchrun, and only a process can be killed in the middle of a C call. The caller's process never
  imports the module's heavy dependencies; the worker pays them once, before it says "ready".
- Each worker bounds its own work with a repeating SIGALRM (it is single-threaded, so the alarm works
  there; it repeats in case a library swallows the first TimeoutError in an `except Exception`). The
  caller waits at most `timeout` seconds; then it kills, reaps and restarts that worker and returns
  None. A worker's first start (its imports) is waited for once, under `startup_timeout`, and not
  counted in `timeout`.
- One worker per concurrent caller, at most `max_workers`; callers beyond that queue, and the queue
  is not counted in `timeout`. Workers exit when their stdin closes and are killed at interpreter exit.
- A worker that cannot even start (a missing dependency) marks the pool broken: every later call
  returns None at once, with one message on stderr.
"""
import atexit
import importlib
import json
import os
import select
import subprocess
import sys
import threading
import time


class _Worker:
    """One `python bounded.py MODULE PRELOAD...` child; a request and its answer are JSON lines."""

    def __init__(self, argv):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, close_fds=True)
        self.ready = False

    def _readline(self, deadline):
        buf = b""
        fd = self.proc.stdout.fileno()
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None  # the worker died
            buf += chunk
        return buf.decode()

    def ask(self, request, timeout, startup_timeout):
        """The answer line, or None if the worker did not answer in time (it is then to be killed)."""
        try:
            if not self.ready:
                self.ready = self._readline(time.monotonic() + startup_timeout) == "ready\n"
                if not self.ready:
                    return None
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            return self._readline(time.monotonic() + timeout)
        except OSError:
            return None

    def kill(self):
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)  # reap: no zombies
        except Exception:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:
                pass


class Pool:
    """Workers that import `module_path` (and `preload`) and run its functions under a time bound."""

    def __init__(self, module_path, preload=(), max_workers=None, startup_timeout=60.0):
        self.argv = [os.path.abspath(module_path), *preload]
        self.max_workers = max_workers or max(1, min(4, os.cpu_count() or 1))
        self.startup_timeout = startup_timeout
        self._idle, self._all, self._lock = [], [], threading.Lock()
        self._slots = threading.BoundedSemaphore(self.max_workers)
        self.broken = False
        _pools.append(self)

    def call(self, function, args, timeout):
        """function(*args) in a worker: its result, or None if it raised, timed out or the worker died."""
        if self.broken:
            return None
        with self._slots:
            with self._lock:
                w = self._idle.pop() if self._idle else self._start()
            line = w.ask([function, args, timeout], timeout, self.startup_timeout)
            with self._lock:
                if not w.ready and not self.broken:
                    self.broken = True
                    print(f"bounded.py: the worker for {self.argv[0]} did not start; calls return None",
                          file=sys.stderr)
                if line is None:  # too slow or dead: replace it now, so that the next call finds it warm
                    w.kill()
                    self._all.remove(w)
                    w = None if self.broken else self._start()
                if w is not None:
                    self._idle.append(w)
        try:
            return json.loads(line) if line is not None else None
        except ValueError:
            return None

    def _start(self):
        w = _Worker(self.argv)
        self._all.append(w)
        return w

    def shutdown(self):
        with self._lock:
            for w in self._all:
                w.kill()
            self._all.clear()
            self._idle.clear()


_pools = []


@atexit.register
def _shutdown():
    for pool in _pools:
        pool.shutdown()


def _serve(module_path, preload):
    """The worker loop: each request runs under its own SIGALRM budget (we are the main thread)."""
    import signal
    sys.setrecursionlimit(10_000)  # parsers recurse deeply; the alarm, not the stack, bounds them
    sys.path.insert(0, os.path.dirname(module_path))
    module = importlib.import_module(os.path.splitext(os.path.basename(module_path))[0])
    for name in preload:  # pay the imports before saying ready
        importlib.import_module(name)

    def alarm(*_):
        raise TimeoutError
    signal.signal(signal.SIGALRM, alarm)
    replies, sys.stdout = sys.stdout, sys.stderr  # what the module prints must not enter the replies
    print("ready", file=replies, flush=True)
    for line in sys.stdin:
        try:
            function, args, timeout = json.loads(line)
            signal.setitimer(signal.ITIMER_REAL, 0.8 * timeout, 0.05)
            answer = json.dumps(getattr(module, function)(*args))
        except BaseException:
            answer = "null"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        print(answer, file=replies, flush=True)


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2:])
