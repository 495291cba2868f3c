"""llama.cpp's own C++ server (`llama-server`) as a backend that `slm serve --backend llama-server` manages.

Why: on a CPU, llama-server's continuous batching (one C++ process, no GIL, its own sampler) serves more tokens a
second than slmkit's Python engines over the same GGUF (BENCHMARKS.md, "Serving: slm serve vs llama-server").
Rather than ask a user to run and secure a second server, `slm serve` starts it on a private loopback port,
waits until its /health says ok, forwards the OpenAI routes to it (proxy.py: slmkit's API key, body and
concurrency limits, admission with 429, timeouts, metrics and chat page stay in front), and stops it on exit.

The binary: `--llama-server-bin PATH`, else $SLM_LLAMA_SERVER, else `llama-server` on PATH, else the one
`build_llama_server()` (`slm build-llama-server`) compiled into $SLMKIT_CACHE/llama-server/ from the
llama.cpp sources that llama-cpp-python's source distribution vendors (pip download from PyPI + cmake: no
model hub, no git).

More llama-server flags (a KV cache type, --flash-attn, --poll): $SLM_LLAMA_SERVER_ARGS, split like a shell line
and appended to the command line slmkit builds.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("slmkit.serve")

MAX_KV_TOKENS = 65536  # the slots' shared KV pool is at most this many tokens (as the llama.cpp engine's batch)
LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python release whose vendored llama.cpp is built (the [llamacpp] extra's)


def cache_dir() -> Path:
    from slmkit import hub
    return hub.cache_dir() / "llama-server"


def find_llama_server(explicit: str | Path | None = None) -> Path:
    """The llama-server binary to run (see the module docstring for the order); a one-line error if none."""
    if explicit:  # the one asked for, or an error: never another binary in its place
        if Path(explicit).is_file() and os.access(explicit, os.X_OK):
            return Path(explicit)
        raise FileNotFoundError(f"--llama-server-bin {explicit}: no executable there")
    candidates = [os.environ.get("SLM_LLAMA_SERVER"), shutil.which("llama-server"),
                  cache_dir() / "bin" / "llama-server"]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    raise FileNotFoundError("no llama-server binary: build one with `slm build-llama-server` (about 10 minutes on "
                            "2 cores), or point $SLM_LLAMA_SERVER / --llama-server-bin at yours")


def build_llama_server(jobs: int | None = None, log=print) -> Path:
    """Compile llama.cpp's server from the sources llama-cpp-python's sdist vendors into cache_dir()/bin (once:
    an existing build is returned). Needs cmake and a C++ compiler."""
    if jobs is not None and jobs < 1:
        raise ValueError(f"--jobs is {jobs}; it must be at least 1")
    target = cache_dir() / "bin" / "llama-server"
    if target.is_file():
        return target
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"building llama-server needs {tool} (apt install cmake g++)")
    work = cache_dir() / "build"
    work.mkdir(parents=True, exist_ok=True)
    sdist = next(work.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"), None)
    if sdist is None:
        log(f"downloading llama-cpp-python {LLAMA_CPP_PYTHON}'s source distribution from PyPI")
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
                        "--no-deps", "--no-binary", ":all:", "-d", str(work)], check=True)
        sdist = next(work.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
    src = work / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if not src.is_dir():
        import tarfile
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
    build = src / "build"
    log(f"configuring llama.cpp in {build}")
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF",
                    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF"],
                   check=True)
    log("building llama-server (minutes)")
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs or os.cpu_count())],
                   check=True)
    # build/bin/ is where llama.cpp's CMake puts binaries (rglob would also meet CMakeFiles/llama-server.dir/)
    built = build / "bin" / "llama-server"
    if not built.is_file():
        raise RuntimeError(f"the build finished without a llama-server binary under {build}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    shutil.copy2(built, tmp)
    os.replace(tmp, target)
    return target


@dataclass
class LlamaServer:
    """A llama-server process on 127.0.0.1:`port`, started by `start_llama_server`; `close()` stops it."""

    proc: subprocess.Popen
    port: int
    log_file: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when slmkit's process dies, however it dies (a SIGKILLed
    `slm serve` left llama-server running, still decoding for clients long gone)."""
    import ctypes
    import signal
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server_args(binary: str | Path, gguf: str | Path, port: int, parallel: int = 16, threads: int | None = None,
                      ctx: int | None = None, alias: str = "model") -> list[str]:
    """llama-server's command line as `start_llama_server` runs it (benchmarks/serve.py runs the same one)."""
    from slmkit.formats.gguf import gguf_context_length
    if ctx is None:  # llama-server's default pool is one context for all slots: 32 clients overflow it
        per_slot = gguf_context_length(gguf)
        ctx = max(per_slot, min(parallel * per_slot, MAX_KV_TOKENS))
    return [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--alias", alias,
            "-np", str(parallel), "-kvu", "-c", str(ctx), "-t", str(threads or os.cpu_count() or 1), "--jinja",
            "--no-webui", "--metrics", "-lv", "2"]  # warnings and errors: a log line per request fills the disk


def llama_server_lora_args(loras: list[str | Path], per_request: bool) -> list[str]:
    """llama-server's flags for LoRA GGUFs: applied to every request, or (`per_request`) loaded at scale 0 for each
    request's `lora` field to choose one (serve/proxy.py)."""
    if bad := next((f for f in loras if "," in str(f)), None):  # llama-server splits --lora at commas
        raise ValueError(f"{bad}: llama-server cannot load a LoRA file whose path has a comma; move or rename it")
    args = [arg for f in loras for arg in ("--lora", str(f))]
    if per_request:
        # --cache-ram 0: llama-server's host-memory prompt cache keys a saved prompt by its tokens only, so a slot
        # could load KV that was computed under another adapter (tests/test_lora_gguf.py reproduces it). A slot's
        # own cache is cleared when its adapter changes, so prefix reuse within a slot stays on.
        args += ["--lora-init-without-apply", "--cache-ram", "0"]
    return args


def start_llama_server(gguf: str | Path, binary: str | Path | None = None, parallel: int = 16,
                       threads: int | None = None, ctx: int | None = None, alias: str = "model",
                       timeout_s: float = 300, extra_args: list[str] = ()) -> LlamaServer:
    """Start llama-server on `gguf` with `parallel` slots sharing one KV pool of `ctx` tokens (default: the
    model's context for each slot, up to MAX_KV_TOKENS in all, as the llama.cpp engine's batch), continuous
    batching and the model's chat template (--jinja, which tool calls need); return once it answers /health, or
    raise with the end of its log."""
    binary = find_llama_server(binary)
    if not Path(gguf).is_file():
        raise FileNotFoundError(f"{gguf}: no such GGUF file")
    port = _free_port()
    try:
        user_args = shlex.split(os.environ.get("SLM_LLAMA_SERVER_ARGS", ""))
    except ValueError as e:
        raise ValueError(f"$SLM_LLAMA_SERVER_ARGS: {e}; quote it as a shell line") from None
    args = [*llama_server_args(binary, gguf, port, parallel, threads, ctx, alias), *extra_args, *user_args]
    log_file = Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])
    with open(log_file, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    server = LlamaServer(proc, port, log_file)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with code {proc.returncode} at start-up: "
                               f"{server.log_tail(600).strip().splitlines()[-1:] or ['(no output)']}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as r:
                if r.status == 200:
                    log.info("llama-server %s on %s (%d slots)", binary, server.url, parallel)
                    return server
        except (urllib.error.URLError, OSError):
            pass  # 503 while the model loads, refused before it listens
        time.sleep(0.2)
    server.close()
    raise TimeoutError(f"llama-server did not answer /health within {timeout_s:g} s (log: {log_file})")
