"""Running code the model wrote, for an environment that executes it (a code runner, a Python tool): one helper,
`run_python`, that runs it in a child process with limits, so that a loop, a memory hog or a network call in the
model's output cannot take the training run down.

    from align.envs.sandbox import run_python
    result = run_python("print(sum(range(10)))", timeout_s=5, cpu_s=2, memory_mb=256)
    result.stdout        # "45\n"; result.ok, result.timed_out, result.returncode, result.stderr

Limits: wall clock (`timeout_s`: the child's whole process group is killed past it), CPU time (`cpu_s`, RLIMIT_CPU),
address space (`memory_mb`, RLIMIT_AS), file size (`file_mb`, RLIMIT_FSIZE), output kept (`max_output` characters
each of stdout and stderr). The child runs in a fresh temporary folder (removed after), with `python -I` (no user
site, no PYTHON* variables) and an environment of its own (only PATH and LANG).

No network: the child gets a network namespace of its own (no interface but a loopback that is down) where the
kernel allows it (root, or unprivileged user namespaces); `result.network` says "namespace". Where it does not, the
child's interpreter refuses to open sockets, start processes or load native libraries through ctypes (an audit
hook installed before the code runs); `result.network` says "audit-hook". Both stop a model's accidental or naive
call; neither is a boundary against code written to escape. For hostile code, run the environment itself in a
container or VM.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
NAMESPACE_FAILED = 97  # the child's exit status when it could not enter a network namespace (the parent retries)

# Run by the child before the code: with no namespace, refuse what reaches outside the process (PEP 578 audit hook).
_GUARD = """
import sys
def _guard(event, args, _blocked=("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                                  "os.fork", "ctypes.dlopen", "pty.spawn")):
    if event.startswith(_blocked):
        raise PermissionError(f"sandbox: {event} is not allowed")
sys.addaudithook(_guard)
"""


@dataclass
class Result:
    stdout: str
    stderr: str
    returncode: int | None  # None: killed at the wall-clock limit; negative: killed by that signal
    timed_out: bool  # the wall-clock limit was reached
    network: str  # how the network was cut: "namespace" or "audit-hook"

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _limits(cpu_s: int, memory_mb: int, file_mb: int, namespace: bool):
    def apply():  # in the child, before exec
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 2**20, memory_mb * 2**20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb * 2**20, file_mb * 2**20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if namespace:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWNET) != 0 and libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
                os._exit(NAMESPACE_FAILED)
    return apply


def run_python(code: str, *, stdin: str = "", timeout_s: float = 5.0, cpu_s: int = 5, memory_mb: int = 512,
               file_mb: int = 16, max_output: int = 64_000) -> Result:
    """Run `code` with the current interpreter in a child process under the limits above; never raises for what the
    code does (its exceptions are in `stderr` with a non-zero `returncode`)."""
    folder = tempfile.mkdtemp(prefix="align-sandbox-")
    try:
        with open(os.path.join(folder, "main.py"), "w") as f:
            f.write(code)
        for namespace in (True, False):
            result = _run(folder, stdin, timeout_s, cpu_s, memory_mb, file_mb, max_output, namespace)
            if result is not None:
                return result
        raise AssertionError("unreachable: the audit-hook run always returns")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run(folder, stdin, timeout_s, cpu_s, memory_mb, file_mb, max_output, namespace) -> Result | None:
    argv = [sys.executable, "-I", "-c", ("" if namespace else _GUARD) +
            "import runpy; runpy.run_path('main.py', run_name='__main__')"]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    proc = subprocess.Popen(argv, cwd=folder, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_limits(cpu_s, memory_mb, file_mb, namespace))
    timed_out = False
    try:
        out, err = proc.communicate(stdin, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
    if namespace and proc.returncode == NAMESPACE_FAILED and not out:
        return None  # no namespace here: again, with the audit hook
    return Result(out[:max_output], err[:max_output], None if timed_out else proc.returncode, timed_out,
                  "namespace" if namespace else "audit-hook")
