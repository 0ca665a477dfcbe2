"""`python -m loadtest`: the same as `agentmesh loadtest`."""

from services._common import grpcenv

grpcenv.prefer_legacy_io()  # before loadtest.cli imports grpc

from loadtest.cli import app  # noqa: E402

if __name__ == "__main__":
    app(prog_name="python -m loadtest")
