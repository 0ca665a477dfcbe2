"""`python -m loadtest`: the same as `agentmesh loadtest`."""

from loadtest.cli import app

if __name__ == "__main__":
    app(prog_name="python -m loadtest")
