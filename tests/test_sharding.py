"""The sharded solves, on 8 virtual CPU devices in a separate process.

The device count is fixed when JAX initialises, and the rest of the suite runs in this
process on one device; so the checks live in `tests/_sharding_checks.py` and run here
under their own pytest, with `XLA_FLAGS=--xla_force_host_platform_device_count=8`.
"""

import os
import subprocess
import sys
from pathlib import Path


CHECKS = Path(__file__).with_name("_sharding_checks.py")


def test_sharding_on_eight_cpu_devices():
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
    env["JAX_PLATFORMS"] = "cpu"
    process = subprocess.run(
        [sys.executable, "-m", "pytest", str(CHECKS), "-q", "-rs"]
        + ["-p", "no:cacheprovider"],
        cwd=CHECKS.parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = process.stdout[-20_000:] + process.stderr[-5_000:]
    assert process.returncode == 0, report
    # Every check ran: none skipped for lack of devices.
    assert "passed" in process.stdout and "needs 8 devices" not in process.stdout
