"""Which VMs are running on a Windows host: the handshake's candidates (no trio, no winreg at import).

Windows lists its running compute systems (the WSL 2 VM among them) as one
subkey per system, named by its GUID, under::

    HKLM\\SOFTWARE\\Microsoft\\Windows NT\\CurrentVersion\\HostComputeService\\VolatileStore\\ComputeSystem

The host-switch probes port 6669 of each (``hvsock://GUID:6669``) and keeps
the one that answers with the signature, so nothing here has to tell a WSL
VM from another compute system.  :class:`ComputeSystems` is the small
interface the rest uses; :class:`RegistryComputeSystems` reads the registry
through ``winreg`` (imported when it first lists, so this module imports on
any platform) or through any object with winreg's four calls (the tests'
fake).  :class:`RegistryCandidates` is what :func:`rdswitch.handshake.find_vm`
calls at the start of every round: VMs come and go, so the list is read again
each time.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Iterable, Protocol

from ..config import HANDSHAKE_PORT
from ..urls import normalize_guid

log = logging.getLogger("rdswitch.host")

COMPUTE_SYSTEM_KEY = r"SOFTWARE\Microsoft\Windows NT\CurrentVersion\HostComputeService\VolatileStore\ComputeSystem"
#: Subkeys read at most per listing (a bound on a registry that misbehaves).
MAX_SYSTEMS = 1024


class ComputeSystems(Protocol):
    """Lists the ids (GUID strings, any spelling) of the compute systems running now."""

    def list_ids(self) -> list[str]: ...


def candidate_urls(ids: Iterable[str], port: int = HANDSHAKE_PORT) -> list[str]:
    """The handshake URLs for these ids: GUIDs normalized, anything else skipped, duplicates dropped, order kept."""
    out: list[str] = []
    for text in ids:
        try:
            guid = normalize_guid(text)
        except ValueError:
            log.debug("compute system %r: not a GUID, skipped", text)
            continue
        url = f"hvsock://{guid}:{port}"
        if url not in out:
            out.append(url)
    return out


class RegistryComputeSystems:
    """:class:`ComputeSystems` from the registry (``winreg``, or an object with its calls)."""

    def __init__(self, winreg: Any = None, key: str = COMPUTE_SYSTEM_KEY) -> None:
        self._winreg = winreg
        self.key = key

    def list_ids(self) -> list[str]:
        winreg = self._winreg if self._winreg is not None else importlib.import_module("winreg")
        try:
            handle = winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, self.key)
        except FileNotFoundError:  # no compute system has run since boot: nothing to probe
            return []
        try:
            ids = []
            for index in range(MAX_SYSTEMS):
                try:
                    ids.append(winreg.EnumKey(handle, index))
                except OSError:  # ERROR_NO_MORE_ITEMS: the end (or the key went away under us)
                    break
            return ids
        finally:
            winreg.CloseKey(handle)


class RegistryCandidates:
    """The handshake's candidate lister: the running compute systems' URLs, read again on every call.

    A failed listing (the registry refuses, say) gives no candidates for that
    round and is logged once until it changes; the next round tries again.
    """

    def __init__(self, systems: ComputeSystems, port: int = HANDSHAKE_PORT) -> None:
        self.systems = systems
        self.port = port
        self._last_error: str | None = None
        self._last: list[str] | None = None

    def __call__(self) -> list[str]:
        try:
            ids = self.systems.list_ids()
        except OSError as exc:
            message = f"cannot list the running VMs in the registry ({COMPUTE_SYSTEM_KEY}): {exc}"
            if message != self._last_error:
                log.warning("%s; trying again every round", message)
                self._last_error = message
            return []
        self._last_error = None
        urls = candidate_urls(ids, self.port)
        if urls != self._last:
            log.info("handshake candidates (running compute systems): %s", ", ".join(urls) or "none")
            self._last = urls
        return urls

    def __repr__(self) -> str:
        return f"<the running compute systems in HKLM\\{COMPUTE_SYSTEM_KEY}, port {self.port}>"
