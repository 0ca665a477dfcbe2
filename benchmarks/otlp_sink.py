"""A stand-in OpenTelemetry collector for measuring what tracing costs: it accepts
OTLP/gRPC trace exports, counts the spans and bytes, and keeps nothing.

    .venv/bin/python benchmarks/otlp_sink.py --port 4317 &
    OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 agentmesh loadtest ...
    kill -INT %1          # prints spans, traces and bytes received

It runs on the same machine as the cluster, like a local collector would, so its CPU
is part of the measured cost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc


class Sink(otlp_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans = 0
        self.exports = 0
        self.bytes = 0
        self.traces: set[bytes] = set()

    async def Export(  # noqa: N802 - the generated servicer's name
        self, request: otlp.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> otlp.ExportTraceServiceResponse:
        self.exports += 1
        self.bytes += request.ByteSize()
        for rs in request.resource_spans:
            for scope in rs.scope_spans:
                self.spans += len(scope.spans)
                self.traces.update(s.trace_id for s in scope.spans)
        return otlp.ExportTraceServiceResponse()


async def main(port: int) -> None:
    sink = Sink()
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    otlp_grpc.add_TraceServiceServicer_to_server(sink, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)
    summary = {
        "spans": sink.spans,
        "traces": len(sink.traces),
        "exports": sink.exports,
        "bytes": sink.bytes,
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=4317)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(parser.parse_args().port))
