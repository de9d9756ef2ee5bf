"""The house rules, checked on the code: imports point down the layers, and the cores import no trio.

Layers, bottom up (docs/architecture.md):

0. ``config`` (addresses, flag parsing) and ``logs``
1. codecs: ``urls``, ``framing``, ``wire/``
2. sans-IO cores: ``stack/``, ``services/``
3. trio building blocks: ``aio/``, ``netlink``
4. the handshake (both sides)
5. the processes: ``host/``, ``vm/``, ``network_setup/``, ``wsl_proxy/``, ``ctl/``
6. what composes the processes: ``sandbox/``, ``gvproxy/``
7. the ``rdswitch`` command: ``rdswitch/__main__``

A module imports only from its own unit or from units of lower layers, and
the processes do not import each other.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PKG = ROOT / "rdswitch"

LAYERS: list[set[str]] = [
    {"config", "logs"},
    {"urls", "framing", "wire"},
    {"stack", "services"},
    {"aio", "netlink"},
    {"handshake"},
    {"host", "vm", "network_setup", "wsl_proxy", "ctl"},
    {"sandbox", "gvproxy"},
    {"__main__"},
]
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def modules() -> list[tuple[str, pathlib.Path]]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out.append((".".join(parts), path))
    return out


def unit_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "rdswitch" or len(parts) < 2:
        return None
    return parts[1]


def imported(module: str, path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)
    return out


def test_every_unit_has_a_layer():
    units = {unit_of(m) for m, _ in modules()} - {None}
    assert units <= set(LAYER_OF), f"units without a layer: {units - set(LAYER_OF)}"


@pytest.mark.parametrize("module,path", modules(), ids=[m for m, _ in modules()])
def test_imports_point_down(module, path):
    me = unit_of(module)
    if me is None:
        return
    for name in imported(module, path):
        other = unit_of(name)
        if other is None or other == me or other not in LAYER_OF:
            continue
        assert LAYER_OF[other] < LAYER_OF[me], f"{module} imports {name}: {other} is not below {me}"


PURE = [m for m, _ in modules() if unit_of(m) in LAYERS[0] | LAYERS[1] | LAYERS[2]]


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_no_trio(module):
    code = (f"import sys, {module}; bad = [m for m in ('trio', 'asyncio', 'anyio', 'hypercorn', 'quart', 'pyroute2') if m in sys.modules]; "
            "print(', '.join(bad)); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0, f"{module} pulls in {res.stderr.strip() or res.stdout.strip()}"
