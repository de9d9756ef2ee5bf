"""The sans-IO flow table (idle timeout + LRU bound) shared by wsl-proxy and the host."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rdswitch.stack.flowtable import FlowTable


def test_flow_table_lru_eviction_and_idle_expiry():
    t: FlowTable = FlowTable(idle_timeout=60, max_flows=2)
    assert t.add("a", "A", now=0) == []
    assert t.add("b", "B", now=1) == []
    assert t.get("a", now=2) == "A"  # a is now the most recently used
    assert t.add("c", "C", now=3) == ["B"]
    assert set(t.values()) == {"A", "C"}
    assert t.expire(now=61) == []
    assert t.next_expiry() == 62
    assert t.expire(now=62) == ["A"]
    t.touch("c", now=100)
    assert t.expire(now=159) == [] and t.expire(now=160) == ["C"]
    assert len(t) == 0 and t.next_expiry() is None


def test_flow_table_remove_only_the_same_flow():
    t: FlowTable = FlowTable(idle_timeout=1, max_flows=5)
    t.add("a", "A1", 0)
    assert t.add("a", "A2", 0) == ["A1"]
    t.remove("a", "A1")  # a stale flow finishing must not drop its successor
    assert "a" in t
    t.remove("a", "A2")
    assert "a" not in t


@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(0, 5)), max_size=60), st.integers(1, 4))
def test_flow_table_never_exceeds_its_bound(ops, bound):
    t: FlowTable = FlowTable(idle_timeout=10, max_flows=bound)
    now, live = 0, {}
    for key, dt in ops:
        now += dt
        for v in t.expire(now):
            live.pop(v)
        if t.get(key, now) is None:
            flow = object()
            for v in t.add(key, flow, now):
                live.pop(v)
            live[flow] = key
        assert len(t) <= bound and len(t) == len(live)


@pytest.mark.parametrize("idle,bound", [(0, 1), (-1, 1), (1, 0)])
def test_flow_table_rejects_bad_limits(idle, bound):
    with pytest.raises(ValueError):
        FlowTable(idle_timeout=idle, max_flows=bound)


def test_flow_table_is_pure():
    """sans-IO: importing it pulls in no trio (the host's shells and wsl-proxy's both use it)."""
    code = "import sys, rdswitch.stack.flowtable; sys.exit('trio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0
