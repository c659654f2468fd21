"""A server for the reliability suite: logmel (cheap DSP) with small limits so
slow consumers, idle streams and overload show up in seconds."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator

import pytest

from tests.server.serving import ServerProcess, running_server


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    """Sum of a metric's samples matching `labels` on /metrics."""
    body = urllib.request.urlopen(f"{server.http_url}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in body.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def rss_bytes(server: ServerProcess) -> int:
    with open(f"/proc/{server.proc.pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb * 1024


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server(
        [
            "--model",
            "logmel",
            "--max-streams",
            "8",
            "--buckets",
            "8",
            "--chunk-blocks",
            "4",
            "--max-output-backlog",
            "4",
            "--slow-consumer-timeout-s",
            "1",
            "--idle-timeout-s",
            "20",
        ]
    ) as s:
        yield s
