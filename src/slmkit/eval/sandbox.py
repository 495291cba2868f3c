"""Run untrusted, model-generated Python (HumanEval-style code tasks, program-aided math) and score it by execution.

Each program runs in its own `python -I -B` process, in a fresh temporary directory that is deleted afterwards,
with layered defences:

1. Limits. `resource` rlimits, set by a small first-stage interpreter (`_SETUP`) that then execs the guarded one:
   address space (`memory_mb`), CPU seconds (a little above the wall-clock timeout), file size (10 MB), process
   count, no core dumps. The child starts its own session;
   on timeout, and after every run, the whole process group is SIGKILLed so stray grandchildren die too. The work
   directory as a whole holds at most WORK_DIR_LIMIT bytes and WORK_FILES_LIMIT files: it is a private tmpfs of
   that size in the child's own mount namespace where the kernel allows it, otherwise this process watches it and
   kills the program when it grows past them (then a fast writer can overshoot by what it writes in 50 ms).
2. No network. The child moves into a fresh user + network namespace that has only a loopback device, which is
   down (the first stage enters it, single-threaded, before it execs the program's interpreter): nothing, not even
   127.0.0.1 of the host, is reachable. This namespace is the real barrier: where the
   kernel does not allow it (probed once, see `isolation`), `run_python` refuses to run unless the caller passes
   `allow_unsandboxed=True` (`slm eval/synth --allow-unsandboxed`). Independently, a bootstrap that runs before the
   program replaces socket creation and name lookup with functions that raise PermissionError; that guard only
   catches accidents (`del sys.modules['_socket']; import _socket`, or ctypes, gets around it).
3. Guarded standard library, like OpenAI human-eval's `reliability_guard`: before the program runs, the bootstrap
   replaces process creation (fork, exec*, spawn*, system, subprocess), signalling other processes, escaping the
   process group, and destructive file operations (remove, rename, chmod, rmtree, ...) with functions that raise
   PermissionError naming the call. The environment is scrubbed (no proxies, tokens, or real HOME).

The verdict: a program passes only if it exits with code 0 AND the bootstrap, after the program's last statement
(for HumanEval: after `check(...)` succeeded), wrote a random per-run marker (which reaches it through a pipe) to a
verdict file. `sys.exit(0)`, `os._exit(0)` or `SystemExit` before the end is a failure. The program does not run
as `__main__` (human-eval's semantics): its `if __name__ == "__main__":` block, `unittest.main()` there included,
does not run (`as_main=True` runs a whole script, for `slm synth program`; the verdict still applies).

What this protects against: the honest mistakes and accidents of generated code -- infinite loops, memory bombs,
fork bombs, filling the disk, deleting files, killing processes, calling out to the network, leaking the
evaluator's environment variables, exiting early with status 0.

What it does NOT protect against: a determined attacker. The guards in (3) live inside the untrusted
interpreter and can be bypassed (ctypes, reloading builtin modules, ...); so can the verdict (the marker sits in
the bootstrap's frame, which frame introspection can read); files the current user may write are still writable
by direct `open()` outside the working directory; without the network namespace, sockets can still reach the
network; CPU/memory limits are per process. This is NOT a security boundary: to run code you do not trust at all,
run the evaluation inside a container or VM without network and with a read-only file system, as an unprivileged
user. Linux is the target platform; on others the namespace layer is skipped (and needs `allow_unsandboxed`).
"""

from __future__ import annotations

import functools
import math
import os
import secrets
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
WORK_DIR_LIMIT = 64 * 1024 * 1024  # total bytes in the work directory
WORK_FILES_LIMIT = 1000  # files and directories in the work directory
WATCH_EVERY_S = 0.05  # without the tmpfs: how often the work directory's limits are checked from outside
SANDBOX_UID = 65534  # the program's uid inside its user namespace ("nobody")

# The first stage of every sandboxed child: a fresh `python -I -S` that enters the namespaces, sets the rlimits and
# then execs the next stage (the guarded interpreter, or the probe's check). It runs after exec, not in a
# preexec_fn between fork and exec, because unshare(CLONE_NEWUSER) fails with EINVAL in a multithreaded process and
# a child forked from this one need not be single-threaded: after torch.set_num_threads, torch's fork handler
# starts a thread in every forked child. A fresh interpreter has one thread. The exec that follows also drops the
# capabilities the new user namespace gave this stage (the program is user SANDBOX_UID there, not 0), so the
# program cannot unmount its tmpfs. argv: namespaces ("none" | "net" | "net+tmpfs"), the uid and gid maps, the
# tmpfs mount options, whether to go on without the namespaces when they fail ("0" | "1"), the status fd ("-":
# exit 1 instead), the rlimits ("AS=soft:hard,..."), then the next stage's argv. On the status fd it writes "ok"
# just before the exec, or "error: <why>" when the namespaces failed.
_SETUP = r"""
import ctypes, os, resource, sys

mode, uid_map, gid_map, tmpfs_options, allow_unsandboxed, status_fd, limits = sys.argv[1:8]
libc = ctypes.CDLL(None, use_errno=True)


def check(rc, what):
    if rc != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def enter_namespaces(tmpfs):
    flags = 0x10000000 | 0x40000000 | (0x00020000 if tmpfs else 0)  # CLONE_NEWUSER | CLONE_NEWNET [| CLONE_NEWNS]
    check(libc.unshare(flags), "unshare")
    if not tmpfs:
        return
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", uid_map),
                       ("/proc/self/gid_map", gid_map)):
        try:
            with open(path, "w") as f:
                f.write(text)
        except OSError as e:
            raise OSError(e.errno, f"write {path}: {e.strerror}") from None
    work = os.getcwd()
    check(libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None), "mount --make-rprivate /")  # MS_REC | MS_PRIVATE
    nosuid_nodev = 0x2 | 0x4
    check(libc.mount(b"tmpfs", work.encode(), b"tmpfs", nosuid_nodev, tmpfs_options.encode()), "mount tmpfs")
    os.chdir(work)  # the cwd is still the directory underneath the mount


def report(text):
    if status_fd != "-":
        os.write(int(status_fd), text.encode())
        os.close(int(status_fd))


if mode != "none":  # before the rlimits: the new namespace inherits the NPROC limit of its creator
    try:
        enter_namespaces(mode == "net+tmpfs")
    except OSError as e:
        if allow_unsandboxed != "1":  # never run without the barrier the probe promised
            if status_fd == "-":
                sys.exit(f"[slmkit sandbox] {e}")
            report(f"error: {e}")
            sys.exit(1)
for item in filter(None, limits.split(",")):
    name, values = item.split("=")
    try:
        resource.setrlimit(getattr(resource, "RLIMIT_" + name), tuple(map(int, values.split(":"))))
    except (AttributeError, ValueError, OSError):
        pass  # a limit this platform does not support (e.g. RLIMIT_AS on macOS)
report("ok")
os.execv(sys.argv[8], sys.argv[8:])
"""


# Runs inside the child before the program: installs the guards, then executes the program file (not as __main__).
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


def _main(path, marker_fd, verdict_fd, name):
    # The verdict: the per-run marker reaches the verdict file only if the program ran to its end. It lives in
    # this frame, not in the program's globals, so code that exits early (sys.exit, os._exit, SystemExit,
    # unittest.main) cannot report success; frame introspection could still find it (see the module docstring).
    write, marker = posix.write, posix.read(marker_fd, 256)
    posix.close(marker_fd)
    with open(path, encoding="utf-8") as f:
        code = compile(f.read(), path, "exec")
    # By default not "__main__" (human-eval's semantics): an answer's `if __name__ == "__main__":` block does not run.
    program = types.ModuleType(name)
    program.__file__ = path
    sys.modules["__main__"] = sys.modules["__program__"] = program
    sys.argv = [path]
    exec(code, program.__dict__)
    for stream in (sys.stdout, sys.stderr):  # output is complete before the marker says so
        if stream is not None:
            stream.flush()
    write(verdict_fd, marker)


_args = sys.argv[1:]
del name, module, blocked
_main(_args[0], int(_args[1]), int(_args[2]), _args[3])
'''


@dataclass
class SandboxResult:
    status: str  # "passed" | "failed" (nonzero exit / exception / early exit / over a limit) | "timeout" | "memory"
    returncode: int | None  # negative: killed by that signal; None: never started
    stdout: str  # the first OUTPUT_LIMIT bytes
    stderr: str  # the last OUTPUT_LIMIT bytes (a traceback's last line is what matters), plus the sandbox's note
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Isolation:
    """What the kernel lets the sandbox do here (probed once: `isolation()`)."""
    network: bool  # a fresh user + network namespace: no network interface but a loopback that is down
    tmpfs: bool  # the work directory is a private tmpfs of WORK_DIR_LIMIT bytes and WORK_FILES_LIMIT inodes


def require_isolation(allow_unsandboxed: bool = False) -> None:
    """Refuse to execute code without the network namespace, unless the caller opted in explicitly.

    The in-process socket guard is defeatable (`del sys.modules['_socket']; import _socket`, ctypes), so the
    namespace is the real barrier. `allow_unsandboxed=True` (CLI: `--allow-unsandboxed`; environment:
    SLMKIT_ALLOW_UNSANDBOXED=1) runs without it, with the guards and the limits only.
    """
    if _unsandboxed_allowed(allow_unsandboxed) or isolation().network:
        return
    raise ValueError("executing generated code needs the sandbox's network namespace, and this machine does not "
                     "allow unprivileged user namespaces (e.g. sysctl kernel.unprivileged_userns_clone=0 or "
                     "kernel.apparmor_restrict_unprivileged_userns=1); enable them, run inside a container "
                     "without network, or pass --allow-unsandboxed (Python: allow_unsandboxed=True) to run it "
                     "with the in-process guards only (see docs/reliability.md)")


def _unsandboxed_allowed(allow_unsandboxed: bool) -> bool:
    return allow_unsandboxed or os.environ.get("SLMKIT_ALLOW_UNSANDBOXED") == "1"


def run_python(program: str, timeout_s: float = 10.0, memory_mb: int = 1024, stdin: str = "",
               allow_unsandboxed: bool = False, as_main: bool = False) -> SandboxResult:
    """Run untrusted Python source in a sandboxed child process (see the module docstring) and classify the result.

    It passes only if it exits 0 after running to its end (the per-run marker, see `_main` in the bootstrap).
    The program's `__name__` is "__program__" (human-eval's semantics for checked answers), or "__main__" with
    `as_main` (a script whose `if __name__ == "__main__":` block prints its result, as `slm synth program` runs).
    Without the network namespace it raises ValueError unless `allow_unsandboxed` (see `require_isolation`).
    """
    if resource is None:
        raise NotImplementedError("the code sandbox needs a POSIX system (the `resource` module)")
    require_isolation(allow_unsandboxed)
    allow_unsandboxed = _unsandboxed_allowed(allow_unsandboxed)
    iso = isolation()
    root = tempfile.mkdtemp(prefix="slm-sandbox-")
    marker = secrets.token_hex(16).encode()
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
        verdict_path = os.path.join(root, "verdict")
        # The marker goes in through a pipe (not argv or the environment, which /proc/self shows the program).
        marker_r, marker_w = os.pipe()
        os.write(marker_w, marker)
        os.close(marker_w)
        status_r, status_w = os.pipe()  # the first stage's "ok" or "error: <why>" (see _SETUP)
        verdict_fd = os.open(verdict_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        over = None
        try:
            with open(os.path.join(root, "stdin"), "rb") as fin, open(out_path, "wb") as fout, \
                    open(err_path, "wb") as ferr:
                start = time.monotonic()
                try:
                    proc = subprocess.Popen(
                        _setup_argv(iso, timeout_s, memory_mb, allow_unsandboxed, status_w,
                                    [sys.executable, "-I", "-B", "-c", _BOOTSTRAP, program_path, str(marker_r),
                                     str(verdict_fd), "__main__" if as_main else "__program__"]),
                        stdin=fin, stdout=fout, stderr=ferr, cwd=work, env=env, close_fds=True,
                        pass_fds=(marker_r, verdict_fd, status_w), start_new_session=True)
                finally:
                    os.close(status_w)  # the child's copy is then the only writer
                # Without the tmpfs the work directory's limits are watched from here (and checked at the end).
                watch = None if iso.tmpfs else (lambda: _work_over_limit(work))
                try:
                    ended, over = _wait_unreaped(proc, timeout_s, watch)
                    timed_out = not ended and over is None
                finally:
                    _kill_group(proc.pid)
                    proc.wait()
                seconds = time.monotonic() - start
            setup = os.read(status_r, 4096).decode(errors="replace")  # the child is gone: this cannot block
        finally:
            os.close(marker_r)
            os.close(verdict_fd)
            os.close(status_r)
        if setup.startswith("error: "):
            raise ValueError(f"the sandboxed child could not enter its namespaces ({setup[7:]}), though the probe "
                             "said it could (too many user namespaces?); retry, or pass --allow-unsandboxed "
                             "(Python: allow_unsandboxed=True)")
        if over is None and not iso.tmpfs:
            over = _work_over_limit(work)
        stdout, stderr = _read_head(out_path), _read_tail(err_path)
        with open(verdict_path, "rb") as f:
            finished = f.read(len(marker) + 1) == marker
    finally:
        _remove_tree(root)
    status = _classify(proc.returncode, stderr, timed_out)
    if over is not None:
        status, stderr = "failed", _note(stderr, f"{over}: counted as failed")
    elif status == "passed" and not finished:
        status = "failed"
        stderr = _note(stderr, "the program exited with code 0 before it ran to its end (sys.exit, os._exit or "
                               "SystemExit): counted as failed")
    return SandboxResult(status, proc.returncode, stdout, stderr, seconds)


def run_many(programs: list[str], timeout_s: float = 10.0, memory_mb: int = 1024,
             workers: int | None = None, allow_unsandboxed: bool = False) -> list[SandboxResult]:
    """Run several programs concurrently (threads, each waiting on its own subprocess); results in input order."""
    workers = workers or os.cpu_count() or 1
    require_isolation(allow_unsandboxed)  # probes once here, not in every thread at the same time
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_python(p, timeout_s=timeout_s, memory_mb=memory_mb,
                                                  allow_unsandboxed=allow_unsandboxed), programs))


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


def network_namespace_available() -> bool:
    """Whether this machine lets us put a child into a fresh user + network namespace (probed once, cached)."""
    return isolation().network


@functools.cache
def isolation() -> Isolation:
    """Probe, once, which namespaces work here: each probe child must come up through the same first stage as
    the programs (`_SETUP`) and see only the loopback interface (and, for the tmpfs, a work directory with the
    sandbox's inode limit), so True means it works."""
    if not sys.platform.startswith("linux"):
        return Isolation(False, False)
    check = ("import os, socket, sys; sys.exit([n for _, n in socket.if_nameindex()] != ['lo'] or "
             f"(len(sys.argv) > 1 and os.statvfs('.').f_files > {WORK_FILES_LIMIT}))")
    for tmpfs in (True, False):
        work = tempfile.mkdtemp(prefix="slm-sandbox-probe-")
        try:
            argv = _setup_argv(Isolation(True, tmpfs), None, None, False, None,
                               [sys.executable, "-I", "-c", check] + (["tmpfs"] if tmpfs else []))
            subprocess.run(argv, cwd=work, check=True, timeout=30, capture_output=True)
            return Isolation(True, tmpfs)
        except (OSError, subprocess.SubprocessError):
            continue
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return Isolation(False, False)


def _setup_argv(iso: Isolation, timeout_s: float | None, memory_mb: int | None, allow_unsandboxed: bool,
                status_fd: int | None, then: list[str]) -> list[str]:
    """The command line of a sandboxed child: the first stage (`_SETUP`), which execs `then`."""
    namespaces = "none" if not iso.network else "net+tmpfs" if iso.tmpfs else "net"
    limits = ""
    if timeout_s is not None:
        cpu_s = math.ceil(timeout_s) + 1
        limits = ",".join([
            f"AS={memory_mb * 1024 * 1024}:{memory_mb * 1024 * 1024}",
            f"CPU={cpu_s}:{cpu_s + 1}",  # SIGXCPU at the soft limit, SIGKILL at the hard one
            f"FSIZE={FILE_SIZE_LIMIT}:{FILE_SIZE_LIMIT}", "CORE=0:0",
            # Inside the new user namespace this counts only the sandbox's own processes and threads; without
            # it, all of this user's. Exec is not a fork, so an already-exceeded limit never stops the child
            # itself. The kernel does not apply it to root: there the guards and the process-group kill remain.
            f"NPROC={MAX_PROCESSES}:{MAX_PROCESSES}"])
    return [sys.executable, "-I", "-B", "-S", "-c", _SETUP, namespaces,
            f"{SANDBOX_UID} {os.geteuid()} 1", f"{SANDBOX_UID} {os.getegid()} 1",
            f"size={WORK_DIR_LIMIT},nr_inodes={WORK_FILES_LIMIT},mode=0700", "1" if allow_unsandboxed else "0",
            "-" if status_fd is None else str(status_fd), limits, *then]


def _work_over_limit(work: str) -> str | None:
    """Why the work directory is over its limits (total bytes, files and directories), or None."""
    size = count = 0
    stack = [work]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            count += 1
            if count > WORK_FILES_LIMIT:
                return f"the work directory holds more than {WORK_FILES_LIMIT} files"
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    size += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
            if size > WORK_DIR_LIMIT:
                return f"the work directory holds more than {WORK_DIR_LIMIT // 2**20} MB"
    return None


def _wait_unreaped(proc: subprocess.Popen, timeout_s: float, watch=None) -> tuple[bool, str | None]:
    """Wait until the child exits, without reaping it: (exited, why `watch()` stopped it, or None).

    While the exited child is unreaped its pid cannot be reused, so the killpg that follows cannot hit an
    unrelated process group. `watch` (called every WATCH_EVERY_S) returns a reason to stop the child, or None.
    """
    deadline = time.monotonic() + timeout_s
    next_watch = time.monotonic() + WATCH_EVERY_S
    delay = 0.001
    while True:
        if hasattr(os, "waitid"):
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True, None
        elif proc.poll() is not None:  # macOS before Python 3.13
            return True, None
        now = time.monotonic()
        if watch is not None and now >= next_watch:
            reason = watch()
            if reason is not None:
                return False, reason
            next_watch = now + WATCH_EVERY_S
        if now >= deadline:
            return False, None
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


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


def _note(stderr: str, text: str) -> str:
    """The sandbox's own verdict note, as the last line of stderr (where a traceback's summary would be)."""
    return (stderr.rstrip("\n") + "\n" if stderr.strip() else "") + f"[slmkit sandbox] {text}\n"


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
