"""host-switch's import path needs nothing Linux-only: it is imported here as Windows would import it.

A fresh interpreter imports the third-party libraries first (under the real
platform: trio picks its Windows I/O backend at import, which needs Windows'
DLLs, and is trio's business), then pretends to be Windows:

* ``sys.platform`` is ``"win32"``;
* Linux-only modules cannot be imported (a meta-path finder refuses pyroute2,
  fcntl, resource, termios, ... and rdswitch's VM-side packages and netlink
  helpers), and those already loaded are dropped from ``sys.modules``;
* ``os.setns``/``os.unshare`` and ``socket.AF_UNIX``/``AF_VSOCK``/``AF_NETLINK``
  are gone, ``socket.AF_HYPERV`` and ``HV_PROTOCOL_RAW`` exist (Python 3.12+
  on Windows), opening anything under ``/proc`` fails, and ``winreg`` is a
  fake holding two running compute systems.

Then it imports ``rdswitch.host.__main__`` (and with it every module of the
host path), builds the parser, runs ``parse_args([])`` (the Windows
defaults: registry candidates and ``hvsock://:6656``), lists the candidates
through the registry reader, and reports what it refused along the way.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = r'''
import builtins, importlib.abc, json, os, socket, sys, types

# -- the third-party libraries, under the real platform
import trio, attrs, dnslib, quart, quart_trio, werkzeug.exceptions
import hypercorn.app_wrappers, hypercorn.config, hypercorn.typing
import hypercorn.trio.tcp_server, hypercorn.trio.worker_context

# -- now Windows
LINUX_ONLY = ("pyroute2", "fcntl", "resource", "termios", "tty", "pty", "grp", "pwd", "_posixshmem",
              "rdswitch.netlink", "rdswitch.vm", "rdswitch.network_setup", "rdswitch.wsl_proxy", "rdswitch.sandbox")
refused = []


def linux_only(name):
    return any(name == m or name.startswith(m + ".") for m in LINUX_ONLY)


class RefuseLinuxOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if linux_only(name):
            refused.append(name)
            raise ImportError(f"{name} is Linux-only (pretending to be Windows)")
        return None


for name in list(sys.modules):
    if linux_only(name):
        del sys.modules[name]
sys.meta_path.insert(0, RefuseLinuxOnly())
sys.platform = "win32"
for attr in ("setns", "unshare"):
    if hasattr(os, attr):
        delattr(os, attr)
for attr in ("AF_UNIX", "AF_VSOCK", "AF_NETLINK"):
    if hasattr(socket, attr):
        delattr(socket, attr)
socket.AF_HYPERV = 34
socket.HV_PROTOCOL_RAW = 1

real_open = builtins.open
proc_reads = []


def no_proc(file, *args, **kw):
    if isinstance(file, str) and file.startswith("/proc"):
        proc_reads.append(file)
        raise FileNotFoundError(2, "no /proc on Windows", file)
    return real_open(file, *args, **kw)


builtins.open = no_proc

VMS = ["{A1B2C3D4-E5F6-4789-8ABC-DEF012345678}", "0F9A3C4E-1B2D-4E5F-8A9B-0C1D2E3F4A5B"]
winreg = types.ModuleType("winreg")
winreg.HKEY_LOCAL_MACHINE = 0x80000002
winreg.OpenKey = lambda root, path: path
winreg.CloseKey = lambda handle: None


def enum_key(handle, index):
    assert handle.endswith(r"HostComputeService\VolatileStore\ComputeSystem"), handle
    if index >= len(VMS):
        raise OSError(259, "No more data is available")
    return VMS[index]


winreg.EnumKey = enum_key
sys.modules["winreg"] = winreg

# -- host-switch, as `python -m rdswitch.host` on Windows imports it
import rdswitch.host.__main__ as host_main
from rdswitch.urls import parse_url

help_text = host_main.build_parser().format_help()
args = host_main.parse_args([])
print(json.dumps({
    "refused": sorted(set(refused)),
    "proc_reads": proc_reads,
    "linux_only_loaded": sorted(m for m in sys.modules if linux_only(m)),
    "listen": args.listen,
    "handshake_used": args.handshake_used,
    "candidates": args.candidates(),
    "family": parse_url(args.listen[0]).family,
    "help_mentions_windows": "HostComputeService" in help_text,
    "dns_source": type(args.dns.upstreams.source).__name__,
    "host_modules": sorted(m for m in sys.modules if m.startswith("rdswitch.")),
}))
'''


def test_host_switch_imports_and_parses_flags_as_on_windows():
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["linux_only_loaded"] == [], out
    assert out["proc_reads"] == [], out
    assert out["listen"] == ["hvsock://:6656"] and out["handshake_used"]
    assert out["candidates"] == ["hvsock://a1b2c3d4-e5f6-4789-8abc-def012345678:6669",
                                 "hvsock://0f9a3c4e-1b2d-4e5f-8a9b-0c1d2e3f4a5b:6669"]
    assert out["family"] == 34
    assert out["help_mentions_windows"]
    assert out["dns_source"] == "WindowsSystem"  # DNS from the system's adapters, not a resolv.conf
    # the whole host path came in: the switch, the NAT, the API, DNS, the handshake, the registry reader
    for module in ("rdswitch.host.switch_host", "rdswitch.host.nat", "rdswitch.host.api", "rdswitch.host.dns_server",
                   "rdswitch.handshake", "rdswitch.host.compute_systems", "rdswitch.aio.connect",
                   "rdswitch.host.win_dns"):
        assert module in out["host_modules"], out["host_modules"]
    # nothing on the path even tried a Linux-only module (a guarded try/except import would show here too)
    assert out["refused"] == [], out["refused"]


def test_the_check_itself_refuses_linux_only_modules():
    """The harness works: under it, the VM side (pyroute2, namespaces) cannot be imported."""
    script = SCRIPT.split("# -- host-switch")[0] + (
        "try:\n    import rdswitch.vm.__main__\nexcept ImportError as exc:\n    print('refused:', exc)\n"
        "else:\n    print('imported')\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "refused:" in res.stdout and "Linux-only" in res.stdout, res.stdout
