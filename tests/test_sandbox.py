"""align.envs.sandbox.run_python, the helper for environments that execute the model's code: output and errors
come back, and a sleep, a busy loop, a memory hog and a network call are each stopped by their limit without
harming the caller."""

from __future__ import annotations

import signal
import socket
import time

import pytest

from align.envs import sandbox
from align.envs.sandbox import run_python


def test_output_and_the_codes_own_errors_come_back():
    ok = run_python("import sys; print(sum(range(10))); print(sys.stdin.read().upper())", stdin="abc")
    assert ok.ok and ok.stdout == "45\nABC\n" and ok.returncode == 0
    bad = run_python("raise ValueError('boom')")
    assert not bad.ok and bad.returncode == 1 and "ValueError: boom" in bad.stderr


def test_a_sleep_is_killed_at_the_wall_clock_limit_with_its_children():
    t0 = time.perf_counter()
    r = run_python("import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)", timeout_s=1)
    assert r.timed_out and r.returncode is None and not r.ok
    assert time.perf_counter() - t0 < 10


def test_a_busy_loop_is_stopped_by_the_cpu_limit():
    r = run_python("while True: pass", cpu_s=1, timeout_s=30)
    assert not r.timed_out and r.returncode in (-signal.SIGXCPU, -signal.SIGKILL), r


def test_a_memory_hog_fails_inside_its_limit():
    r = run_python("x = bytearray(2 * 1024 ** 3)", memory_mb=256)
    assert not r.ok and "MemoryError" in r.stderr, r


@pytest.fixture
def listener():
    """A server on this machine's loopback that the sandboxed code tries to reach."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    yield server.getsockname()[1]
    server.close()


REACH = ("import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=3)\n    print('reached')\n"
         "except Exception as e:\n    print(type(e).__name__, e)\n")


def test_the_network_is_out_of_reach(listener):
    r = run_python(REACH.format(port=listener), timeout_s=20)
    assert r.ok and "reached" not in r.stdout and r.network in ("namespace", "audit-hook"), r


def test_without_a_namespace_the_audit_hook_refuses_sockets_and_processes(listener, tmp_path):
    (tmp_path / "main.py").write_text(REACH.format(port=listener) + "import os\nos.system('true')\n")
    r = sandbox._run(str(tmp_path), "", 20, 5, 512, 16, 64_000, namespace=False)
    assert r.network == "audit-hook" and "PermissionError sandbox: socket." in r.stdout, r
    assert "PermissionError: sandbox: os.system is not allowed" in r.stderr, r
