"""Fixtures of the end-to-end test bed (see tests/testbed.py)."""

import tempfile

import pytest

from testbed import Bed


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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.rep_call = rep
