"""The code-execution sandbox: results are classified right, limits hold, and nothing escapes or is left behind."""

import math
import os
import socket
import sys
import textwrap
import time

import pytest

from slmkit.eval import sandbox
from slmkit.eval.sandbox import (
    WORK_DIR_LIMIT,
    WORK_FILES_LIMIT,
    Isolation,
    SandboxResult,
    humaneval_program,
    network_namespace_available,
    pass_at_k,
    run_many,
    run_python,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox targets Linux")


def _gone(pid: int, wait_s: float = 3.0) -> bool:
    """True once the process no longer runs (it may linger briefly as a zombie until its new parent reaps it)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_passing_program_captures_stdout():
    r = run_python("print('hello', 6 * 7)")
    assert isinstance(r, SandboxResult)
    assert r.status == "passed" and r.passed and r.returncode == 0
    assert r.stdout == "hello 42\n"
    assert r.stderr == ""
    assert 0 < r.seconds < 5


def test_stdin_is_passed():
    r = run_python("import sys; print(sys.stdin.read().upper())", stdin="abc")
    assert r.passed and r.stdout == "ABC\n"


def test_failing_assert_is_failed_with_traceback():
    r = run_python("x = 1\nassert x == 2, 'wrong answer'\n")
    assert r.status == "failed" and not r.passed and r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == "AssertionError: wrong answer"
    assert "line 2" in r.stderr  # the program's own line numbers survive the bootstrap


def test_syntax_error_is_failed():
    r = run_python("def f(:\n    return 1\n")
    assert r.status == "failed"
    assert "SyntaxError" in r.stderr


def test_infinite_loop_times_out_and_process_is_killed():
    start = time.monotonic()
    r = run_python("import os\nprint(os.getpid(), flush=True)\nwhile True:\n    pass\n", timeout_s=1.0)
    assert r.status == "timeout" and not r.passed
    assert time.monotonic() - start < 2.5
    assert _gone(int(r.stdout.split()[0]))


def test_process_creation_is_blocked():
    for call in ("os.fork()", "subprocess.run(['sleep', '30'])", "os.execv('/bin/sh', ['sh', '-c', 'true'])",
                 "multiprocessing.Process(target=print).start()"):
        r = run_python(f"import multiprocessing, os, subprocess\n{call}\n")
        assert r.status == "failed", call
        assert "PermissionError" in r.stderr.strip().splitlines()[-1], call


@pytest.mark.parametrize("parent_waits", [False, True])
def test_grandchild_that_escapes_the_guard_is_killed(parent_waits):
    # libc fork via ctypes bypasses the Python-level guard; the process-group kill still gets the grandchild,
    # both when the program exits normally and when it times out.
    program = textwrap.dedent(f"""
        import ctypes, os, time
        pid = ctypes.CDLL(None).fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        print(pid, flush=True)
        if {parent_waits}:
            time.sleep(60)
    """)
    r = run_python(program, timeout_s=1.5)
    assert r.status == ("timeout" if parent_waits else "passed")
    assert _gone(int(r.stdout.split()[0]))


def test_memory_bomb_is_memory():
    r = run_python("x = bytearray(4 * 1024**3)\n", memory_mb=256)
    assert r.status == "memory" and not r.passed
    assert "MemoryError" in r.stderr


def test_file_size_is_limited():
    r = run_python("open('big.bin', 'wb').write(b'x' * (20 * 1024 * 1024))\n")
    assert r.status == "failed"
    assert "File too large" in r.stderr


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


def _assert_no_connection(server):
    time.sleep(0.1)
    with pytest.raises(BlockingIOError):
        server.accept()


def test_no_network_through_socket_module(listener):
    port = listener.getsockname()[1]
    for call in (f"socket.create_connection(('127.0.0.1', {port}), timeout=2)",
                 f"socket.socket().connect(('127.0.0.1', {port}))",
                 f"_socket.socket().connect(('127.0.0.1', {port}))",
                 "socket.getaddrinfo('example.com', 80)"):
        r = run_python(f"import socket, _socket\n{call}\n")
        assert r.status == "failed", call
        assert "PermissionError" in r.stderr, call
    _assert_no_connection(listener)


@pytest.mark.skipif(not network_namespace_available(), reason="no unprivileged network namespace on this machine")
def test_network_namespace_stops_raw_sockets(listener):
    # ctypes socket()/connect() bypass the Python guard; only the empty network namespace stops these.
    port = listener.getsockname()[1]
    program = textwrap.dedent(f"""
        import ctypes, struct
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.socket(2, 1, 0)  # AF_INET, SOCK_STREAM
        addr = struct.pack("<H", 2) + struct.pack(">H", {port}) + bytes([127, 0, 0, 1]) + bytes(8)
        rc = libc.connect(fd, addr, len(addr))
        print(fd, rc, ctypes.get_errno())
        assert rc == 0, "connect failed"
    """)
    r = run_python(program)
    assert r.status == "failed", r.stdout
    assert "connect failed" in r.stderr
    _assert_no_connection(listener)


def test_os_system_is_blocked(tmp_path):
    target = tmp_path / "pwned"
    r = run_python(f"import os\nos.system('touch {target}')\n")
    assert r.status == "failed"
    assert "os.system" in r.stderr
    assert not target.exists()


def test_deleting_files_is_blocked(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    for call in (f"os.remove('{victim}')", f"os.unlink('{victim}')", f"shutil.rmtree('{tmp_path}')",
                 f"os.rename('{victim}', 'stolen')"):
        r = run_python(f"import os, shutil\n{call}\n")
        assert r.status == "failed", call
    assert victim.read_text() == "precious"


def test_working_directory_is_temporary_and_removed():
    r = run_python("import os\nopen('out.txt', 'w').write('data')\nprint(os.getcwd())\nprint(os.listdir('.'))\n")
    assert r.passed
    cwd, listing = r.stdout.splitlines()
    assert listing == "['out.txt']"  # a fresh, empty directory: the program's source is not in it
    assert os.path.isabs(cwd) and not os.path.exists(cwd)
    assert not os.path.exists(os.path.dirname(cwd))


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret-token")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    r = run_python("import os\nprint(sorted(os.environ))\nprint(os.environ['HOME'] == os.getcwd())\n")
    assert r.passed
    assert "HF_TOKEN" not in r.stdout and "HTTPS_PROXY" not in r.stdout
    assert r.stdout.splitlines()[-1] == "True"


def test_output_is_truncated_keeping_stderr_tail():
    r = run_python("import sys\nprint('x' * 100_000)\nsys.stderr.write('e' * 100_000)\nraise ValueError('the end')\n")
    assert r.status == "failed"
    assert len(r.stdout) < 10_000 and r.stdout.startswith("xxx") and "truncated" in r.stdout
    assert len(r.stderr) < 10_000 and r.stderr.strip().endswith("ValueError: the end")


def test_run_many_keeps_input_order():
    # later programs finish first, so completion order is the reverse of input order
    programs = [f"import time\ntime.sleep({0.3 - 0.1 * i})\nprint({i})\n" for i in range(3)] + ["assert False"]
    results = run_many(programs, timeout_s=5, workers=4)
    assert [r.stdout.strip() for r in results[:3]] == ["0", "1", "2"]
    assert [r.status for r in results] == ["passed", "passed", "passed", "failed"]


def test_pass_at_k_matches_combinatorial_formula():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 1, 10), (200, 17, 1), (200, 17, 10), (200, 17, 100), (5, 2, 3)]:
        expected = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-12), (n, c, k)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the plain pass rate


def test_pass_at_k_edge_cases():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 8, 3) == 1.0  # n - c < k: every draw of k contains a pass
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(5, 2, 10)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)


def test_humaneval_program_passes_right_and_fails_wrong_completion():
    prompt = 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b."""\n'
    test = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
    program = humaneval_program(prompt, "    return a + b\n", test, "add")
    assert program.endswith("\n\ncheck(add)\n")
    assert run_python(program).passed
    wrong = run_python(humaneval_program(prompt, "    return a - b\n", test, "add"))
    assert wrong.status == "failed" and "AssertionError" in wrong.stderr


# --- the verdict: only a program that runs to its end passes (issue 22, item 1) --------------------------------

ADD_PROMPT = 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b."""\n'
ADD_TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


@pytest.mark.parametrize("exit_call", ["import sys; sys.exit(0)", "import os; os._exit(0)", "raise SystemExit",
                                       "exit()", "raise SystemExit(0)"])
def test_exiting_with_status_0_before_the_checks_is_a_failure(exit_call):
    # a wrong answer that exits early used to score as passed (exit code 0)
    completion = f"    return a - b\n{exit_call}\n"
    r = run_python(humaneval_program(ADD_PROMPT, completion, ADD_TEST, "add"))
    assert r.returncode == 0 and r.status == "failed" and not r.passed
    assert r.stderr.strip().splitlines()[-1].startswith("[slmkit sandbox] the program exited with code 0 before")


def test_exit_inside_the_checked_function_is_a_failure():
    r = run_python(humaneval_program(ADD_PROMPT, "    import sys\n    sys.exit(0)\n", ADD_TEST, "add"))
    assert r.status == "failed" and r.returncode == 0


def test_writing_to_inherited_descriptors_cannot_fake_the_marker():
    program = "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'0' * 32)\n" \
              "    except OSError:\n        pass\nos._exit(0)\n"
    assert run_python(program).status == "failed"


def test_program_does_not_run_as_main():
    r = run_python("print(__name__)\nif __name__ == '__main__':\n    raise AssertionError('main block ran')\n")
    assert r.passed and r.stdout == "__program__\n"
    # an answer that ends with a unittest entry point: the block is skipped, the checks decide
    tail = "\nif __name__ == '__main__':\n    import unittest\n    unittest.main()\n"
    assert run_python(humaneval_program(ADD_PROMPT, "    return a + b\n" + tail, ADD_TEST, "add")).passed
    wrong = run_python(humaneval_program(ADD_PROMPT, "    return a - b\n" + tail, ADD_TEST, "add"))
    assert wrong.status == "failed" and "AssertionError" in wrong.stderr


def test_unittest_main_at_top_level_cannot_pass():
    program = "import unittest\nclass T(unittest.TestCase):\n    def test(self):\n        pass\nunittest.main()\n"
    assert run_python(program).status == "failed"


def test_output_is_flushed_before_the_verdict():
    r = run_python("import sys\nsys.stdout.write('no newline, no flush')\n")
    assert r.passed and r.stdout == "no newline, no flush"


# --- the work directory's total size and file count -------------------------------------------------------------

@pytest.fixture(params=["tmpfs", "watched"])
def work_limit_mode(request, monkeypatch):
    """Both ways the limit is enforced: the kernel's tmpfs, and (where that is unavailable) watching from outside."""
    if request.param == "tmpfs":
        if not sandbox.isolation().tmpfs:
            pytest.skip("no unprivileged mount namespace on this machine")
    else:
        network = sandbox.isolation().network
        monkeypatch.setattr(sandbox, "isolation", lambda: Isolation(network=network, tmpfs=False))
    return request.param


def test_work_directory_total_size_is_limited(work_limit_mode):
    # every file is under the per-file limit; together they are over the directory's
    n = WORK_DIR_LIMIT // (8 * 2**20) + 2
    program = (f"import time\nfor i in range({n}):\n    open(f'f{{i}}', 'wb').write(b'x' * (8 * 2**20))\n"
               "time.sleep(5)\n")
    r = run_python(program, timeout_s=10)
    assert r.status == "failed" and r.seconds < 5
    assert "No space left on device" in r.stderr or "work directory holds more than 64 MB" in r.stderr


def test_work_directory_file_count_is_limited(work_limit_mode):
    program = f"import os\nos.mkdir('d')\nfor i in range({WORK_FILES_LIMIT + 50}):\n    open(f'd/{{i}}', 'w').close()\n"
    r = run_python(program)
    assert r.status == "failed"
    assert "No space left on device" in r.stderr or f"more than {WORK_FILES_LIMIT} files" in r.stderr
    assert run_python(f"for i in range({WORK_FILES_LIMIT // 2}):\n    open(str(i), 'w').close()\n").passed


# --- no code execution without the network namespace, unless asked for ----------------------------------------

def test_refuses_to_run_without_the_network_namespace_unless_allowed(monkeypatch):
    monkeypatch.setattr(sandbox, "isolation", lambda: Isolation(network=False, tmpfs=False))
    monkeypatch.delenv("SLMKIT_ALLOW_UNSANDBOXED", raising=False)
    with pytest.raises(ValueError, match="--allow-unsandboxed"):
        run_python("print(1)")
    with pytest.raises(ValueError, match="network namespace"):
        run_many(["print(1)"])
    assert run_python("print(1)", allow_unsandboxed=True).passed
    assert [r.passed for r in run_many(["print(1)"], allow_unsandboxed=True)] == [True]
    monkeypatch.setenv("SLMKIT_ALLOW_UNSANDBOXED", "1")
    assert run_python("print(1)").passed


@pytest.mark.skipif(not sandbox.isolation().tmpfs, reason="needs unprivileged user + mount namespaces")
def test_a_failed_namespace_entry_stops_the_run_instead_of_running_unisolated(monkeypatch):
    # The probe said yes, but the child cannot enter the namespaces. A real failure inside the child's first stage:
    # a uid map for a uid this process is not (only one's own uid may be mapped without CAP_SETUID outside).
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 424242)
    monkeypatch.delenv("SLMKIT_ALLOW_UNSANDBOXED", raising=False)
    with pytest.raises(ValueError, match=r"could not enter its namespaces \(.*uid_map.*\).*--allow-unsandboxed"):
        run_python("open('ran', 'w').close()\nprint(1)")
    with pytest.raises(ValueError, match="could not enter its namespaces"):
        run_many(["print(1)", "print(2)"])
    assert run_python("print(1)", allow_unsandboxed=True).passed


@pytest.mark.skipif(not network_namespace_available(), reason="no unprivileged network namespace on this machine")
def test_the_sandbox_works_after_torch_started_its_thread_pool():
    # torch.set_num_threads installs a fork handler that starts a thread in every forked child, and
    # unshare(CLONE_NEWUSER) fails with EINVAL in a multithreaded process: the namespaces are entered after exec.
    torch = pytest.importorskip("torch")
    torch.set_num_threads(torch.get_num_threads())
    sandbox.isolation.cache_clear()
    try:
        assert sandbox.isolation().network  # the probe, run again now
        program = "import socket; print([n for _, n in socket.if_nameindex()])"
        for result in [run_python(program)] + run_many([program] * 3, workers=3):
            assert result.passed and result.stdout.strip() == "['lo']", result
    finally:
        sandbox.isolation.cache_clear()
