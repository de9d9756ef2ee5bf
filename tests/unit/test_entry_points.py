"""The installed commands (pyproject [project.scripts]) and their ``python -m`` twins.

The scripts live next to the interpreter that runs the tests (the venv's bin/),
where ``pip install -e .`` (scripts/setup) put them.
"""

import os
import subprocess
import sys

import pytest

BIN = os.path.dirname(sys.executable)

# command, python -m module, a flag its usage must name
COMMANDS = [
    ("host-switch", "rdswitch.host", "--listen"),
    ("vm-switch", "rdswitch.vm", "--tap-interface"),
    ("network-setup", "rdswitch.network_setup", "--tap-interface"),
    ("wsl-proxy", "rdswitch.wsl_proxy", "--socketFile"),
]


def script(name: str) -> str:
    path = os.path.join(BIN, name)
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is not installed: run scripts/setup (pip install -e .)")
    return path


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert "error" in last or "unknown" in last, res.stderr
    for needle in needles:
        assert needle in last, res.stderr


@pytest.mark.parametrize("name,module,flag", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_installed_command_help_and_bad_flag(name, module, flag):
    res = run([script(name), "--help"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: "), res.stdout[:200]
    assert flag in res.stdout
    assert_one_line_error(run([script(name), "--no-such-flag"]), "unrecognized arguments: --no-such-flag")


@pytest.mark.parametrize("name,module,flag", COMMANDS, ids=[c[1] for c in COMMANDS])
def test_python_dash_m_still_works(name, module, flag):
    res = run([sys.executable, "-m", module, "--help"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: ") and flag in res.stdout


def test_rdswitch_command_and_its_subcommands():
    rd = script("rdswitch")
    res = run([rd, "--help"])
    assert res.returncode == 0 and "usage: " in res.stdout and "sandbox" in res.stdout
    assert_one_line_error(run([rd, "--no-such-flag"]), "--no-such-flag")
    assert len(run([rd, "--no-such-flag"]).stderr.strip().splitlines()) == 1
    res = run([rd, "sandbox", "--help"])
    assert res.returncode == 0 and res.stdout.startswith("usage: ") and "--allow-outbound" in res.stdout
    res = run([rd, "ctl", "--help"])
    assert res.returncode == 0 and res.stdout.startswith("usage: ")
    assert "expose" in res.stdout and "--api" in res.stdout
    assert_one_line_error(run([rd, "ctl", "--api", "unix:///nonexistent", "list", "--no-such-flag"]), "--no-such-flag")
    # ctl reaches the API it is pointed at: a missing socket is a one-line error, exit 1
    res = run([rd, "ctl", "--api", "unix:///nonexistent/api.sock", "list"])
    assert res.returncode == 1 and "cannot reach the API" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
