"""Fixtures of the end-to-end test bed (see tests/testbed.py)."""

import os
import subprocess
import sys
import tempfile

import pytest

import nsutil
from testbed import Bed, free_port, stop

PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers.py")


@pytest.fixture
def bed(request):
    tmp = tempfile.mkdtemp(prefix="rdt-")
    b = Bed(tmp)
    try:
        yield b
    finally:
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            print(b.logs())
        b.close()


@pytest.fixture
def host_server():
    """The peers.py server on the host's 127.0.0.1 (TCP blob + UDP echo on one port)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, PEERS, "serve", "127.0.0.1", str(port)])
    try:
        nsutil.wait_for(lambda: subprocess.run(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"],
                                               capture_output=True).returncode == 0, 10, what="host server")
        yield port
    finally:
        stop(proc)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.rep_call = rep
