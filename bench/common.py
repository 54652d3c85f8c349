"""What the benchmarks share: free loopback ports and servers run as subprocesses."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(args: list[str], port: int, env: dict[str, str], cwd: str) -> Iterator[int]:
    """Run `args` until the block ends; yield its pid once `port` accepts connections."""
    proc = subprocess.Popen(
        args, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.1)
        time.sleep(1.0)  # let start-up settle (idle RSS is read right after)
        yield proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=20)
