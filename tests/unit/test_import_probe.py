"""The sans-IO cores stay sans-IO: importing one, in a fresh interpreter, loads no I/O framework.

A pure module that imports trio (directly or through a helper) has grown a
shell; move that code to ``rdswitch/host`` (or wherever its shell lives).  To
cover another pure module, add its name to ``PURE_MODULES``; to forbid another
framework, add it to ``FORBIDDEN``.
"""

import json
import os
import subprocess
import sys

import pytest

PURE_MODULES = [
    "rdswitch.services.dhcp",
    "rdswitch.services.forwarder",
    "rdswitch.services.dns",
    "rdswitch.services.dns.zones",
    "rdswitch.services.dns.authority",
    "rdswitch.services.dns.message",
    "rdswitch.services.dns.resolvconf",
]

# Top-level packages a pure module must not pull in.  (``socket`` cannot be on the
# list: dnslib imports it at import time, without using it for anything we call.)
FORBIDDEN = ["trio", "hypercorn", "asyncio", "anyio"]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(m for m in json.loads(sys.argv[2]) if m in sys.modules)))
"""


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_imports_no_io_framework(module):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, module, json.dumps(FORBIDDEN)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=60,
    )
    assert proc.returncode == 0, f"importing {module} failed:\n{proc.stderr}"
    loaded = json.loads(proc.stdout)
    assert loaded == [], f"importing {module} loads {loaded}: a pure module must not"
