"""Per-packet tracing toggled at run time: SIGUSR1 to host-switch and to vm-switch (like the incumbent's)."""

from __future__ import annotations

import os
import signal

import nsutil

GATEWAY = "192.168.127.1"


def _lines_after(text: str, marker: str) -> list[str]:
    return text[text.rindex(marker):].splitlines()[1:]


def test_sigusr1_toggles_one_line_per_frame(bed):
    hs = bed.host_switch()
    vm = bed.vm(hs)
    assert "per-packet tracing is now" not in hs.read_log()  # off by default
    vm.run(["ping", "-c", "1", "-W", "2", GATEWAY])
    assert "from VM:" not in hs.read_log() and "tap -> host:" not in vm.read_log()

    for proc_pid in (hs.pid, vm.proc.pid):
        os.kill(proc_pid, signal.SIGUSR1)
    on = "per-packet tracing is now on (SIGUSR1)"
    nsutil.wait_for(lambda: on in hs.read_log() and on in vm.read_log(), 10, what="the toggle logged")
    vm.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", GATEWAY])
    # one line per frame, each way, in both processes
    hs_after = _lines_after(hs.read_log(), on)
    vm_after = _lines_after(vm.read_log(), on)
    requests = [ln for ln in hs_after if "from VM:" in ln and f"> {GATEWAY} ICMP type 8" in ln]
    replies = [ln for ln in hs_after if "to VM:" in ln and f"IPv4 {GATEWAY} > " in ln and "ICMP type 0" in ln]
    assert len(requests) == 2 and len(replies) == 2, "\n".join(hs_after)
    assert len([ln for ln in vm_after if "tap -> host:" in ln and "ICMP type 8" in ln]) == 2, "\n".join(vm_after)
    assert len([ln for ln in vm_after if "host -> tap:" in ln and "ICMP type 0" in ln]) == 2, "\n".join(vm_after)

    for proc_pid in (hs.pid, vm.proc.pid):
        os.kill(proc_pid, signal.SIGUSR1)
    off = "per-packet tracing is now off (SIGUSR1)"
    nsutil.wait_for(lambda: off in hs.read_log() and off in vm.read_log(), 10, what="the toggle logged")
    vm.run(["ping", "-c", "1", "-W", "2", GATEWAY])
    vm.run(["ping", "-c", "1", "-W", "2", GATEWAY])
    assert not [ln for ln in _lines_after(hs.read_log(), off) if "from VM:" in ln or "to VM:" in ln]
    assert not [ln for ln in _lines_after(vm.read_log(), off) if "tap" in ln and "-> " in ln]
    assert hs.proc.poll() is None and vm.proc.poll() is None


def test_trace_packets_flag_starts_it_on(bed):
    hs = bed.host_switch("--trace-packets")
    vm = bed.vm(hs, "--trace-packets")
    assert "per-packet tracing is now on (--trace-packets)" in hs.read_log()
    assert "per-packet tracing is now on (--trace-packets)" in vm.read_log()
    # the DHCP exchange that gave the lease is in both logs already
    assert "from VM: 5a:94:ef:e4:0c:ee > ff:ff:ff:ff:ff:ff IPv4 0.0.0.0:68 > 255.255.255.255:67 UDP" in hs.read_log()
    assert "dhcp client -> host:" in vm.read_log() and "192.168.127.1:67 > 192.168.127.2:68 UDP" in vm.read_log()
