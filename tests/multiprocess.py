"""Tests that need many devices run them in other processes; this module starts those.

Standard library only: the gloo workers import it before torch.distributed is set up.

* ``run_on_host_devices``: pytest over a test module in a second process whose JAX has N
  forced host devices (the rest of the suite keeps one);
* ``launch_ranks``: N processes of a script (``script RANK PORT OUT``) that form a gloo
  group on a free local port.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["ROOT", "launch_ranks", "run_on_host_devices"]


def run_on_host_devices(test_file: str, devices: int) -> None:
    """Run pytest over ``test_file`` with ``devices`` JAX host devices and assert it passed,
    skipping only the test that called this. Compiling dominates these runs: XLA's
    cheapest CPU code generation halves it."""
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
        "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", test_file]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and summary.count("skipped") <= 1, summary  # only the caller


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(script: str, world: int, out: Path, timeout: float = 240) -> None:
    """Run ``world`` processes ``python script RANK PORT OUT`` (one thread each) and wait;
    assert every one exited 0, else show the end of each rank's log (``out/rank_R.log``)."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    logs = [Path(out, f"rank_{rank}.log") for rank in range(world)]
    processes = []
    for rank, log in enumerate(logs):
        with log.open("w") as stream:  # the child holds its own copy of the file
            processes.append(
                subprocess.Popen(
                    [sys.executable, script, str(rank), str(port), str(out)],
                    env=env,
                    cwd=ROOT,
                    stdout=stream,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        for process in processes:
            process.wait(timeout=timeout)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    failed = [p.returncode for p in processes if p.returncode]
    assert not failed, "\n".join(log.read_text()[-3000:] for log in logs)
