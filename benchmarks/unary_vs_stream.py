"""What one small request costs as a unary call and as a message on a bidi stream.

    .venv/bin/python benchmarks/unary_vs_stream.py --rate 770 --seconds 8

A grpc.aio server in a child process echoes 60-byte messages, through a unary method
and through a bidirectional stream. The client sends them at a steady `--rate` (as the
load harness's open loop does: each one when it is due, never batched), first as
unary calls, then on one stream, and prints for each the CPU milliseconds per call of
the client and of the server (utime + stime from /proc) and the round trip's P50 and
P99. Both processes choose gRPC's I/O engine as every agentmesh process does
(services/_common/grpcenv.py); GRPC_EXPERIMENTS="" gives grpcio's default.

This is the cost that SubmitStream saves a client that submits one task at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services._common import grpcenv  # noqa: E402

grpcenv.prefer_legacy_io()  # before grpc is imported

import grpc  # noqa: E402
import uvloop  # noqa: E402

SERVICE = "bench.Echo"
MESSAGE = b"x" * 60


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def serve() -> None:
    async def unary(request: bytes, context: object) -> bytes:
        return request

    async def bidi(requests: object, context: object) -> object:
        async for request in requests:  # type: ignore[attr-defined]
            yield request

    handlers = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.stream_stream_rpc_method_handler(bidi),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handlers,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


async def paced(rate: float, n: int, send: object) -> list[float]:
    """Call `send(t0)` for message i at i / rate; the round trips, sorted."""
    took: list[float] = []
    start = time.perf_counter()
    for i in range(n):
        wait = start + i / rate - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        await send(took)  # type: ignore[operator]
    return took


async def unary_run(channel: grpc.aio.Channel, rate: float, n: int) -> list[float]:
    call = channel.unary_unary(f"/{SERVICE}/Unary")
    await call(MESSAGE)
    pending: list[asyncio.Task[None]] = []

    async def one(took: list[float]) -> None:
        t0 = time.perf_counter()
        await call(MESSAGE)
        took.append(time.perf_counter() - t0)

    async def send(took: list[float]) -> None:
        pending.append(asyncio.ensure_future(one(took)))

    took = await paced(rate, n, send)
    await asyncio.gather(*pending)
    return took


async def stream_run(channel: grpc.aio.Channel, rate: float, n: int) -> list[float]:
    call = channel.stream_stream(f"/{SERVICE}/Stream")()
    await call.write(MESSAGE)
    await call.read()
    sent: list[float] = []
    took: list[float] = []

    async def reader() -> None:
        for i in range(n):
            await call.read()
            took.append(time.perf_counter() - sent[i])

    reading = asyncio.ensure_future(reader())

    async def send(_: list[float]) -> None:
        sent.append(time.perf_counter())
        await call.write(MESSAGE)

    await paced(rate, n, send)
    await reading
    await call.done_writing()
    return took


async def measure(port: int, server_pid: int, mode: str, rate: float, n: int) -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        c0, s0 = cpu_s(os.getpid()), cpu_s(server_pid)
        run = unary_run if mode == "unary" else stream_run
        took = sorted(await run(channel, rate, n))
        c1, s1 = cpu_s(os.getpid()), cpu_s(server_pid)
    return (
        f"{mode:6}  client {1000 * (c1 - c0) / n:.3f} ms/call  server "
        f"{1000 * (s1 - s0) / n:.3f} ms/call  round trip P50 {1000 * took[n // 2]:.3f} "
        f"P99 {1000 * took[int(n * 0.99)]:.3f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=770.0, help="messages per second")
    parser.add_argument("--seconds", type=float, default=8.0, help="per mode")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    uvloop.install()
    if args.serve:
        asyncio.run(serve())
        return
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        n = int(args.rate * args.seconds)
        print(
            f"{n} messages per mode at {args.rate:g}/s, GRPC_EXPERIMENTS="
            f"{os.environ.get('GRPC_EXPERIMENTS')!r}"
        )
        for mode in ("unary", "stream"):
            print(asyncio.run(measure(port, server.pid, mode, args.rate, n)))
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
