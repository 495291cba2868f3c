"""Run untrusted, model-generated Python (HumanEval-style code tasks, program-aided math) and score it by execution.

Each program runs in its own `python -I -B` process, in a fresh temporary directory that is deleted afterwards,
with layered defences:

1. Limits. `resource` rlimits set between fork and exec: address space (`memory_mb`), CPU seconds (a little above
   the wall-clock timeout), file size (10 MB), process count, no core dumps. The child starts its own session;
   on timeout, and after every run, the whole process group is SIGKILLed so stray grandchildren die too.
2. No network. Where the kernel lets an unprivileged process do it (probed once, see
   `network_namespace_available`), the child moves into a fresh user + network namespace that has only a
   loopback device, which is down: nothing, not even 127.0.0.1 of the host, is reachable. Independently, a
   bootstrap that runs before the program replaces socket creation and name lookup with functions that raise
   PermissionError.
3. Guarded standard library, like OpenAI human-eval's `reliability_guard`: before the program runs, the bootstrap
   replaces process creation (fork, exec*, spawn*, system, subprocess), signalling other processes, escaping the
   process group, and destructive file operations (remove, rename, chmod, rmtree, ...) with functions that raise
   PermissionError naming the call. The environment is scrubbed (no proxies, tokens, or real HOME).

What this protects against: the honest mistakes and accidents of generated code -- infinite loops, memory bombs,
fork bombs, filling the disk, deleting files, killing processes, calling out to the network, leaking the
evaluator's environment variables.

What it does NOT protect against: a determined attacker. The guards in (3) live inside the untrusted
interpreter and can be bypassed (ctypes, reloading builtin modules, ...); files the current user may write are
still writable by direct `open()` outside the working directory; without the network namespace, raw sockets via
ctypes can still reach the network; CPU/memory limits are per process. This is NOT a security boundary: to run
code you do not trust at all, run the evaluation inside a container or VM without network and with a read-only
file system, as an unprivileged user. Linux is the target platform; on others the namespace layer is skipped.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

try:
    import resource
except ImportError:  # Windows: no rlimits, so no sandbox
    resource = None

OUTPUT_LIMIT = 8 * 1024  # bytes of stdout (head) and stderr (tail) kept in a SandboxResult
FILE_SIZE_LIMIT = 10 * 1024 * 1024  # largest file the program may write, its stdout/stderr files included
MAX_PROCESSES = 16  # RLIMIT_NPROC (threads count too); the guarded program cannot start processes anyway

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000

# Runs inside the child before the program: installs the guards, then executes the program file as __main__.
# It compiles the program from its file so tracebacks show the program's real file name and line numbers.
_BOOTSTRAP = r'''
import builtins, os, posix, shutil, socket, subprocess, sys, types
import _posixsubprocess, _socket


def _blocked(name):
    def blocked(*args, **kwargs):
        raise PermissionError(f"{name}() is disabled in the slmkit sandbox")
    return blocked


# Process creation, signalling other processes, leaving the process group, destructive file operations.
# Patched in `posix` too, so `import posix` or reloading `os` does not bring them back.
for name in ("system", "popen", "fork", "forkpty", "vfork", "kill", "killpg", "setsid", "setpgid", "setpgrp",
             "setuid", "seteuid", "setreuid", "setresuid", "setgid", "setegid", "setregid", "setresgid",
             "chroot", "fchdir",
             "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
             "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
             "posix_spawn", "posix_spawnp",
             "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
             "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chflags", "lchflags"):
    for module in (os, posix):
        if hasattr(module, name):
            setattr(module, name, _blocked(f"os.{name}"))
subprocess.Popen = _blocked("subprocess.Popen")
_posixsubprocess.fork_exec = _blocked("_posixsubprocess.fork_exec")
for name in ("rmtree", "move", "chown"):
    setattr(shutil, name, _blocked(f"shutil.{name}"))
sys.modules["resource"] = None  # the program may not raise its own limits


class _NoSocket(socket.socket):
    # A subclass rather than a function, so modules that subclass socket.socket (ssl, ...) still import.
    def __init__(self, *args, **kwargs):
        raise PermissionError("network access is disabled in the slmkit sandbox")


class _NoRawSocket(_socket.socket):
    def __init__(self, *args, **kwargs):
        raise PermissionError("network access is disabled in the slmkit sandbox")


socket.socket = socket.SocketType = _NoSocket
_socket.socket = _socket.SocketType = _NoRawSocket
for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo", "gethostbyname",
             "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
    blocked = _blocked(f"socket.{name}")
    for module in (socket, _socket):
        if hasattr(module, name):
            setattr(module, name, blocked)

path = sys.argv[1]
with open(path, encoding="utf-8") as f:
    code = compile(f.read(), path, "exec")
main = types.ModuleType("__main__")
main.__file__ = path
sys.modules["__main__"] = main
sys.argv = [path]
del f, name, module, blocked, path
exec(code, main.__dict__)
'''


@dataclass
class SandboxResult:
    status: str  # "passed" | "failed" (nonzero exit / exception) | "timeout" | "memory"
    returncode: int | None  # negative: killed by that signal; None: never started
    stdout: str  # the first OUTPUT_LIMIT bytes
    stderr: str  # the last OUTPUT_LIMIT bytes (a traceback's last line is what matters)
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_python(program: str, timeout_s: float = 10.0, memory_mb: int = 1024, stdin: str = "") -> SandboxResult:
    """Run untrusted Python source in a sandboxed child process (see the module docstring) and classify the result."""
    if resource is None:
        raise NotImplementedError("the code sandbox needs a POSIX system (the `resource` module)")
    isolate_network = network_namespace_available()
    root = tempfile.mkdtemp(prefix="slm-sandbox-")
    try:
        # The program's cwd/HOME/TMPDIR is `work`; its source and captured output sit beside it, not in it.
        work = os.path.join(root, "work")
        os.mkdir(work)
        program_path = os.path.join(root, "program.py")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(program)
        with open(os.path.join(root, "stdin"), "w", encoding="utf-8") as f:
            f.write(stdin)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
               "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               # glibc reserves 64 MB of address space per thread arena, which RLIMIT_AS would count
               "MALLOC_ARENA_MAX": "2"}
        # Output goes to files, not pipes: RLIMIT_FSIZE bounds them, so a program printing forever cannot
        # fill this process's memory, and there is no pipe to deadlock on.
        out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
        with open(os.path.join(root, "stdin"), "rb") as fin, open(out_path, "wb") as fout, \
                open(err_path, "wb") as ferr:
            start = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", "-c", _BOOTSTRAP, program_path],
                stdin=fin, stdout=fout, stderr=ferr, cwd=work, env=env, close_fds=True,
                start_new_session=True, preexec_fn=_preexec(timeout_s, memory_mb, isolate_network),
            )
            try:
                timed_out = not _wait_unreaped(proc, timeout_s)
            finally:
                _kill_group(proc.pid)
                proc.wait()
            seconds = time.monotonic() - start
        stdout, stderr = _read_head(out_path), _read_tail(err_path)
    finally:
        _remove_tree(root)
    status = _classify(proc.returncode, stderr, timed_out)
    return SandboxResult(status, proc.returncode, stdout, stderr, seconds)


def run_many(programs: list[str], timeout_s: float = 10.0, memory_mb: int = 1024,
             workers: int | None = None) -> list[SandboxResult]:
    """Run several programs concurrently (threads, each waiting on its own subprocess); results in input order."""
    workers = workers or os.cpu_count() or 1
    network_namespace_available()  # probe once here, not in every thread at the same time
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_python(p, timeout_s=timeout_s, memory_mb=memory_mb), programs))


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program the official human-eval harness executes for one sample: it raises if a test fails."""
    return prompt + completion + "\n\n" + test + f"\n\ncheck({entry_point})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which avoids the huge binomials of the direct formula.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n (got n={n}, c={c})")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, i.e. at least k samples per problem (got k={k}, n={n})")
    if n - c < k:  # every k-subset contains a passing sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@functools.cache
def network_namespace_available() -> bool:
    """Whether this machine lets us put a child into a fresh user + network namespace (probed once, cached).

    The probe child must come up and see only the loopback interface, so True means the isolation really works.
    """
    if not sys.platform.startswith("linux") or _libc() is None:
        return False
    check = "import socket, sys; sys.exit([n for _, n in socket.if_nameindex()] != ['lo'])"
    try:
        subprocess.run([sys.executable, "-I", "-c", check], preexec_fn=_unshare_network, check=True,
                       timeout=30, capture_output=True)
        return True
    except (OSError, subprocess.SubprocessError):
        return False


@functools.cache
def _libc():
    # Loaded in the parent: dlopen in a child forked from a threaded parent could deadlock on the loader lock.
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _unshare_network() -> None:
    if _libc().unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def _preexec(timeout_s: float, memory_mb: int, isolate_network: bool):
    """The function run in the child between fork and exec; kept to plain system calls (the parent may have threads)."""
    cpu_s = math.ceil(timeout_s) + 1
    limits = [
        (resource.RLIMIT_AS, (memory_mb * 1024 * 1024,) * 2),
        (resource.RLIMIT_CPU, (cpu_s, cpu_s + 1)),  # SIGXCPU at the soft limit, SIGKILL at the hard one
        (resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT,) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
        # Inside the new user namespace this counts only the sandbox's own processes and threads; without it,
        # all of this user's. Exec is not a fork, so an already-exceeded limit never stops the child itself.
        # The kernel does not apply it to root: there the guards and the process-group kill remain.
        (resource.RLIMIT_NPROC, (MAX_PROCESSES,) * 2),
    ]

    def preexec() -> None:
        if isolate_network:  # before the rlimits: the new namespace inherits the NPROC limit of its creator
            try:
                _unshare_network()
            except OSError:
                pass  # the socket guard in the bootstrap still applies
        for limit, values in limits:
            try:
                resource.setrlimit(limit, values)
            except (ValueError, OSError):
                pass  # a limit this platform does not support (e.g. RLIMIT_AS on macOS)

    return preexec


def _wait_unreaped(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait until the child exits, without reaping it; False on timeout.

    While the exited child is unreaped its pid cannot be reused, so the killpg that follows cannot hit an
    unrelated process group.
    """
    deadline = time.monotonic() + timeout_s
    if not hasattr(os, "waitid"):  # macOS before Python 3.13
        try:
            proc.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    delay = 0.001
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left in the group


def _classify(returncode: int, stderr: str, timed_out: bool) -> str:
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode == 0:
        return "passed"
    lines = stderr.strip().splitlines()
    last = lines[-1] if lines else ""
    # MemoryError from RLIMIT_AS; a SIGKILL we did not send is most likely the kernel's OOM killer.
    if last.startswith("MemoryError") or "Cannot allocate memory" in last or returncode == -signal.SIGKILL:
        return "memory"
    return "failed"


def _read_head(path: str) -> str:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        data = f.read(OUTPUT_LIMIT)
    text = data.decode("utf-8", errors="replace")
    return text if size <= OUTPUT_LIMIT else text + f"\n...[truncated: {size} bytes in all]"


def _read_tail(path: str) -> str:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(max(0, size - OUTPUT_LIMIT))
        text = f.read().decode("utf-8", errors="replace")
    return text if size <= OUTPUT_LIMIT else f"[truncated: {size} bytes in all]...\n" + text


def _remove_tree(path: str) -> None:
    """Delete the sandbox directory even if the program made parts of it unreadable or unwritable."""
    try:
        shutil.rmtree(path)
        return
    except OSError:
        pass
    for parent, dirs, _ in os.walk(path):
        for d in dirs:
            try:
                os.chmod(os.path.join(parent, d), 0o700)
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=True)
