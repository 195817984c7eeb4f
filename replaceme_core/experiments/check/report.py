"""What a check found (Report), and the guard that keeps it offline (no_network, NetworkUsed)."""
from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, field
from typing import Iterator


@dataclass
class Report:
    """What a check found: errors fail it; warnings and notes are printed with the summary."""

    label: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)
    downloads: list[str] = field(default_factory=list)
    estimate: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # estimated GPU seconds per notebook ("01": …); bundle slices

    def error(self, msg: str) -> None:
        line = f"profile {self.label}: {msg}"
        if line not in self.errors:
            self.errors.append(line)

    def warn(self, msg: str) -> None:
        line = f"profile {self.label}: {msg}"
        if line not in self.warnings:
            self.warnings.append(line)

    def count(self, what: str, n: int = 1) -> None:
        self.checked[what] = self.checked.get(what, 0) + n


class NetworkUsed(RuntimeError):
    """Something tried to open a network connection during the check."""


@contextlib.contextmanager
def no_network() -> Iterator[None]:
    """Hub libraries in offline mode, and any attempt to resolve a host or connect a socket raises NetworkUsed.

    The environment variables make huggingface_hub / datasets / transformers not even try; the socket guard makes
    sure nothing else does (local Unix sockets stay allowed)."""
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    for k in saved_env:
        os.environ[k] = "1"
    saved = (socket.socket.connect, socket.socket.connect_ex, socket.create_connection, socket.getaddrinfo)

    def refuse(what):
        raise NetworkUsed(f"the offline check tried to reach the network ({what})")

    def connect(self, address, *a):
        if self.family == getattr(socket, "AF_UNIX", None):
            return saved[0](self, address, *a)
        refuse(address)

    def connect_ex(self, address, *a):
        if self.family == getattr(socket, "AF_UNIX", None):
            return saved[1](self, address, *a)
        refuse(address)

    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
    socket.create_connection = lambda address, *a, **k: refuse(address)
    socket.getaddrinfo = lambda host, *a, **k: refuse(host)
    try:
        yield
    finally:
        socket.socket.connect, socket.socket.connect_ex, socket.create_connection, socket.getaddrinfo = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
