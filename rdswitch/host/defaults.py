"""What host-switch serves when flags leave it open (pure: the platform's facts come in as arguments).

* Windows: with neither ``--listen`` nor ``--handshake``, find the VM by the
  handshake over hvsock among the running compute systems (the registry,
  :mod:`rdswitch.host.compute_systems`) and listen on ``hvsock://:6656``.
* Linux (and other hosts): the VM's CID is not known here, so there is no
  handshake unless ``--handshake vsock://CID:6669`` says where; the data URL
  defaults to ``vsock://:6656`` when AF_VSOCK works, else to a unix socket in
  ``$XDG_RUNTIME_DIR``.
* Whenever a vsock or hvsock handshake runs without ``--listen``, the data
  URL is the wire contract's port 6656 of that transport (the VM dials it
  after READY).  A handshake over unix or TCP needs an explicit ``--listen``.
"""

from __future__ import annotations

import os

import attrs

from ..config import DATA_PORT, ConfigError
from ..urls import parse_url

#: The socket name in $XDG_RUNTIME_DIR when AF_VSOCK is not available.
RUNTIME_SOCKET = "rdswitch-host.sock"

HELP = f"""\
defaults (without --listen and --handshake):
  Windows  find the WSL VM by the handshake: every running compute system
           listed under HKLM\\...\\HostComputeService\\VolatileStore\\ComputeSystem
           is probed at hvsock://VMID:6669 about once a second; listen on
           hvsock://:{DATA_PORT} and admit only the VM that answered
  Linux    listen on vsock://:{DATA_PORT} if AF_VSOCK works here, else on
           unix://$XDG_RUNTIME_DIR/{RUNTIME_SOCKET}; no handshake (give
           --handshake vsock://CID:6669 for a VM with that CID; the data URL
           is then vsock://:{DATA_PORT})
With --handshake, only the VM that passed it may open a data session (over
vsock its CID, over hvsock its VM id); other peers are refused and logged.
"""


@attrs.frozen
class Plan:
    listen: list[str]
    #: --handshake URLs, as given
    handshake: list[str]
    #: find the VM among the running compute systems (Windows' default)
    registry: bool = False

    @property
    def handshake_used(self) -> bool:
        return self.registry or bool(self.handshake)


def plan(listen: list[str], handshake: list[str], *, windows: bool, vsock_works: bool,
         runtime_dir: str | None) -> Plan:
    """The listen URLs and the handshake host-switch runs with; ConfigError (one line) when there is nothing to serve."""
    listen, handshake = list(listen), list(handshake)
    registry = windows and not listen and not handshake
    if listen:
        return Plan(listen, handshake, registry)
    schemes = {parse_url(url).scheme for url in handshake}
    if registry or "hvsock" in schemes:
        return Plan([f"hvsock://:{DATA_PORT}"], handshake, registry)
    if "vsock" in schemes:
        return Plan([f"vsock://:{DATA_PORT}"], handshake, registry)
    if handshake:
        raise ConfigError("nothing to serve: a --handshake over unix or tcp needs a --listen URL for the data connection")
    if windows:  # pragma: no cover - registry is set above
        raise AssertionError
    if vsock_works:
        return Plan([f"vsock://:{DATA_PORT}"], [], False)
    if runtime_dir and os.path.isabs(runtime_dir):
        return Plan([f"unix://{os.path.join(runtime_dir, RUNTIME_SOCKET)}"], [], False)
    raise ConfigError("nothing to serve: give at least one --listen URL (AF_VSOCK does not work here and "
                      "$XDG_RUNTIME_DIR is not set)")
