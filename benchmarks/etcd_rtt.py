"""What one etcd call costs a client on this machine, back to back and after an idle gap.

    .venv/bin/python benchmarks/etcd_rtt.py --calls 300 --gaps 0,0.001,0.01

Starts a private etcd (temp dir, stopped on the way out) and times, for each gap
between calls: a Range of one key, a Put of 200 bytes, and a Txn shaped like the
coordinator's create (one nested transaction: a create-revision compare and three
puts), each from a plain synchronous gRPC client and from grpc.aio on uvloop (the
client the services use). A gap of 0.01 s is what each call sees at 100 tasks/s:
the processes on both ends (and etcd's goroutines) have gone idle in between.
Also times a one-byte ping-pong between two processes over a socketpair, the
machine's own wake-up cost, and a 300-byte write + fdatasync of a file beside etcd's
data, the disk's own share of every commit (etcd fsyncs its WAL once per commit). Prints P50/P90/P99 in ms, and one JSON line. gRPC uses
the services' I/O engine (`services/_common/grpcenv.py`); `GRPC_EXPERIMENTS=""` gives
grpcio's default, which the figures of issue 13's third session were measured with.

This is the floor under the light-load latency of a durable task: every task waits
for one such commit before its agent gets it, and for another before its client
sees the result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services._common.grpcenv import prefer_legacy_io  # noqa: E402

prefer_legacy_io()  # the services' gRPC I/O engine, unless GRPC_EXPERIMENTS says otherwise

import grpc  # noqa: E402
import uvloop  # noqa: E402
from aetcd import rpc  # noqa: E402

from registry.etcd import Etcd, cmp_create, op_put  # noqa: E402
from registry.etcd_server import EtcdServer  # noqa: E402

KINDS = ("range", "put", "txn")


def percentiles(seconds: list[float]) -> dict[str, float]:
    s = sorted(seconds)
    return {
        f"p{q}_ms": round(s[min(len(s) - 1, int(len(s) * q / 100))] * 1e3, 3) for q in (50, 90, 99)
    }


def txn_request(i: int) -> rpc.TxnRequest:
    request = rpc.TxnRequest()
    nested = request.success.add().request_txn
    nested.compare.append(cmp_create(b"/rtt/t/%d" % i, 0))
    nested.success.append(op_put(b"/rtt/t/%d" % i, b"v" * 200))
    nested.success.append(op_put(b"/rtt/c/%d" % i, b"1"))
    nested.success.append(op_put(b"/rtt/o/%d" % i, b""))
    return request


def idle(gap: float) -> None:
    if gap:
        time.sleep(gap)


def timed_sync(endpoint: str, calls: int, gap: float, run: int) -> dict[str, dict[str, float]]:
    channel = grpc.insecure_channel(endpoint)
    kv = rpc.KVStub(channel)
    kv.Put(rpc.PutRequest(key=b"/rtt/k", value=b"v"))
    ops: dict[str, Callable[[int], object]] = {
        "range": lambda i: kv.Range(rpc.RangeRequest(key=b"/rtt/k")),
        "put": lambda i: kv.Put(rpc.PutRequest(key=b"/rtt/p/%d" % i, value=b"v" * 200)),
        "txn": lambda i: kv.Txn(txn_request(run * 1_000_000 + i)),
    }
    out = {}
    for kind in KINDS:
        took = []
        for i in range(calls):
            t = time.perf_counter()
            ops[kind](i)
            took.append(time.perf_counter() - t)
            idle(gap)
        out[kind] = percentiles(took)
    channel.close()
    return out


async def timed_aio(endpoint: str, calls: int, gap: float, run: int) -> dict[str, dict[str, float]]:
    etcd = Etcd(endpoint, prefix="/rtt-aio/")
    await etcd.put(b"/rtt/k", b"v")
    out = {}
    for kind in KINDS:
        took = []
        for i in range(calls):
            t = time.perf_counter()
            if kind == "range":
                await etcd.get(b"/rtt/k")
            elif kind == "put":
                await etcd.put(b"/rtt/q/%d" % i, b"v" * 200)
            else:
                await etcd.txn_request(txn_request(run * 1_000_000 + 500_000 + i))
            took.append(time.perf_counter() - t)
            if gap:
                await asyncio.sleep(gap)
        out[kind] = percentiles(took)
    await etcd.close()
    return out


def ping_pong(calls: int, gap: float) -> dict[str, float]:
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the echo side
        a.close()
        while data := b.recv(64):
            b.send(data)
        os._exit(0)
    b.close()
    took = []
    for _ in range(calls):
        t = time.perf_counter()
        a.send(b"x")
        a.recv(64)
        took.append(time.perf_counter() - t)
        idle(gap)
    a.close()
    os.waitpid(pid, 0)
    return percentiles(took)


def disk_sync(directory: Path, calls: int, gap: float) -> dict[str, float]:
    fd = os.open(directory / "fdatasync-probe", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    took = []
    try:
        for _ in range(calls):
            t = time.perf_counter()
            os.write(fd, b"w" * 300)
            os.fdatasync(fd)
            took.append(time.perf_counter() - t)
            idle(gap)
    finally:
        os.close(fd)
    return percentiles(took)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per kind and gap")
    parser.add_argument("--gaps", default="0,0.001,0.01", help="idle seconds between calls")
    args = parser.parse_args()
    gaps = [float(g) for g in args.gaps.split(",")]
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = EtcdServer(Path(tmp) / "data")
        server.start()
        try:
            for run, gap in enumerate(gaps):
                row = {
                    "sync": timed_sync(server.endpoint, args.calls, gap, run),
                    "aio": uvloop.run(timed_aio(server.endpoint, args.calls, gap, run)),
                    "ping_pong": ping_pong(args.calls, gap),
                    "fdatasync": disk_sync(Path(tmp), args.calls, gap),
                }
                results[str(gap)] = row
                print(f"gap {gap * 1e3:g} ms between calls ({args.calls} calls each):")
                for client in ("sync", "aio"):
                    for kind in KINDS:
                        p = row[client][kind]  # type: ignore[index]
                        print(
                            f"  etcd {kind:5} {client:4}  P50 {p['p50_ms']:.3f}  "
                            f"P90 {p['p90_ms']:.3f}  P99 {p['p99_ms']:.3f} ms"
                        )
                for name, label in (
                    ("ping_pong", "socketpair ping-pong"),
                    ("fdatasync", "disk fdatasync"),
                ):
                    p = row[name]
                    print(
                        f"  {label:22} P50 {p['p50_ms']:.3f}  P90 {p['p90_ms']:.3f}  "  # type: ignore[index]
                        f"P99 {p['p99_ms']:.3f} ms"  # type: ignore[index]
                    )
        finally:
            server.stop()
    print(json.dumps({"calls": args.calls, "results": results}))


if __name__ == "__main__":
    main()
