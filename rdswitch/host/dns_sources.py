"""Where the host's DNS settings come from: a resolv.conf file, or Windows' own configuration.

``Upstreams`` (``dns_upstream.py``) follows one ``DnsSource``: it asks for a
cheap change ``token()`` and only ``read()``s when the token differs from the
last one.  Both raise ``OSError`` when the settings cannot be read (the last
known ones are kept).

* ``ResolvConfFile`` -- the token is the file's stat (device, inode, size,
  mtime); ``read`` parses the text (``services/dns/resolvconf.py``).
* ``WindowsSystem`` -- Windows has no file to stat and no cheap "DNS changed"
  signal (``NotifyIpInterfaceChange`` does not fire when only the DNS servers
  change), so it polls: the token is the raw snapshot -- the adapters from
  ``GetAdaptersAddresses`` and the registry's search lists, a few
  milliseconds -- and ``read`` converts the snapshot the last ``token()`` took
  (``services/dns/winadapters.py``).  ``recheck_interval`` bounds how often.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Hashable, Protocol, Sequence

from rdswitch.services.dns.resolvconf import ResolvConf, parse_resolv_conf
from rdswitch.services.dns.winadapters import Adapter, resolv_conf_from_adapters

log = logging.getLogger(__name__)

DEFAULT_RESOLV_CONF = "/etc/resolv.conf"
WINDOWS_RECHECK_INTERVAL = 2.0


class DnsSource(Protocol):
    description: str  # for log lines: "/etc/resolv.conf", "the Windows network adapters"
    recheck_interval: float  # the least time between two checks on the query path

    def token(self) -> Hashable: ...

    def read(self) -> ResolvConf: ...


class ResolvConfFile:
    recheck_interval = 0.25

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.description = self.path

    def token(self) -> Hashable:
        st = os.stat(self.path)
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def read(self) -> ResolvConf:
        with open(self.path, encoding="utf-8", errors="replace") as f:
            return parse_resolv_conf(f.read(1 << 20))

    def __repr__(self) -> str:
        return f"ResolvConfFile({self.path!r})"


Snapshot = tuple[tuple[Adapter, ...], tuple[str, ...], str]


class WindowsSystem:
    """Windows' DNS servers and search domains, polled.

    ``read_adapters`` and ``read_search_lists`` default to the real readers of
    ``win_dns`` (Windows only); tests pass fakes.
    """

    description = "the Windows network adapters"

    def __init__(
        self,
        read_adapters: Callable[[], Sequence[Adapter]] | None = None,
        read_search_lists: Callable[[], tuple[Sequence[str], str]] | None = None,
        *,
        recheck_interval: float = WINDOWS_RECHECK_INTERVAL,
    ):
        if read_adapters is None or read_search_lists is None:
            from rdswitch.host import win_dns  # defines ctypes structures only; calls nothing

            read_adapters = read_adapters or win_dns.read_adapters
            read_search_lists = read_search_lists or win_dns.read_search_lists
        self._read_adapters = read_adapters
        self._read_search_lists = read_search_lists
        self.recheck_interval = recheck_interval
        self._snapshot: Snapshot | None = None

    def token(self) -> Snapshot:
        try:
            adapters = tuple(self._read_adapters())
            search_list, primary = self._read_search_lists()
        except OSError:
            raise
        except Exception as exc:  # a surprise in the system's data must cost the update, not the DNS service
            log.warning("reading %s failed", self.description, exc_info=True)
            raise OSError(f"unexpected {exc!r}") from exc
        self._snapshot = (adapters, tuple(search_list), primary or "")
        return self._snapshot

    def read(self) -> ResolvConf:
        snapshot = self._snapshot if self._snapshot is not None else self.token()
        adapters, search_list, primary = snapshot
        return resolv_conf_from_adapters(adapters, search_list, primary)

    def __repr__(self) -> str:
        return "WindowsSystem()"
