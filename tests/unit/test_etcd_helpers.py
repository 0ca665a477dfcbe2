"""Pure helpers of registry.etcd: range ends, keys under the cluster prefix, compares."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aetcd import rpc

from registry.etcd import Etcd, WatchEvent, prefix_end
from services._common.errors import StoreUnavailableError


@pytest.mark.parametrize(
    ("prefix", "end"),
    [
        (b"/agentmesh/a/", b"/agentmesh/a0"),  # "/" + 1 == "0"
        (b"abc", b"abd"),
        (b"a\xff", b"b"),  # a trailing 0xff cannot grow: carry into the byte before
        (b"a\xff\xff", b"b"),
        (b"\xfe\xff", b"\xff"),
        (b"\xff", b"\0"),  # nothing sorts after every 0xff key: "\0" means "to the end"
        (b"\xff\xff", b"\0"),
        (b"", b"\0"),  # the empty prefix covers the whole keyspace
    ],
)
def test_prefix_end(prefix: bytes, end: bytes) -> None:
    assert prefix_end(prefix) == end


@pytest.mark.parametrize(
    ("prefix", "outside"),
    [
        (b"/agentmesh/a/", b"/agentmesh/a0"),
        (b"/agentmesh/a/", b"/agentmesh/ab"),
        (b"abc", b"abd"),
        (b"a\xff", b"b"),
        (b"x\xfe\xff", b"x\xff"),
    ],
)
def test_prefix_range_holds_exactly_the_keys_under_the_prefix(
    prefix: bytes, outside: bytes
) -> None:
    end = prefix_end(prefix)
    for key in (prefix, prefix + b"\x00", prefix + b"zzz", prefix + b"\xff\xff\xff"):
        assert prefix <= key < end
    assert not prefix <= outside < end


async def test_keys_live_under_the_cluster_prefix() -> None:
    # Etcd only opens a lazy channel here: no etcd is contacted.
    etcd = Etcd("http://127.0.0.1:1", prefix="/agentmesh/blue")
    try:
        assert etcd.prefix == b"/agentmesh/blue/"
        assert etcd.key("tasks", "t1") == b"/agentmesh/blue/tasks/t1"
        assert etcd.endpoints == "127.0.0.1:1"
    finally:
        await etcd.close()


def test_no_endpoint_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="AGENTMESH_ETCD"):
        Etcd(" , ")


async def test_watch_forever_resumes_after_the_last_event_it_delivered() -> None:
    etcd = Etcd("127.0.0.1:1")  # never contacted: the stream is faked below
    starts: list[int] = []

    async def broken_then_fine(
        key: bytes,
        *,
        prefix: bool = False,
        start_revision: int = 0,
        prev_kv: bool = False,
        no_put: bool = False,
    ) -> AsyncIterator[tuple[int, list[WatchEvent]]]:
        starts.append(start_revision)
        if len(starts) == 1:
            # a watch catching up on a backlog: events up to 1005, sent under a header
            # carrying the store's current revision, then the stream breaks
            yield 5000, [WatchEvent("put", rpc.KeyValue(key=key, mod_revision=1005), None)]
            raise StoreUnavailableError("etcd restarted")
        yield 5000, [WatchEvent("put", rpc.KeyValue(key=key, mod_revision=1006), None)]

    etcd.watch = broken_then_fine  # type: ignore[method-assign]
    stream = etcd.watch_forever(b"k", start_revision=10)
    try:
        assert [ev.kv.mod_revision for ev in (await anext(stream))[1]] == [1005]
        assert [ev.kv.mod_revision for ev in (await anext(stream))[1]] == [1006]
    finally:
        await stream.aclose()
        await etcd.close()
    # resuming from 5001 would have skipped revisions 1006..5000
    assert starts == [10, 1006]
