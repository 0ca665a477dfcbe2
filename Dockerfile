# syntax=docker/dockerfile:1
# One image for every agentmesh service; compose.yaml picks the service with
# `serve <service>`. Build: docker build -t agentmesh:local .

# Build stage: installs into a venv that the runtime stage copies whole. The C
# compiler stays here: hdrhistogram has no wheel for linux/arm64 and is compiled there.
FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/agentmesh
ENV PATH=/opt/agentmesh/bin:$PATH
WORKDIR /src
# The dependencies first, from pyproject.toml alone, so that a code change
# reuses this (largest) layer.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
COPY protos ./protos
COPY services ./services
COPY registry ./registry
COPY loadtest ./loadtest
RUN pip install . \
 && agentmesh --help > /dev/null

FROM python:3.11-slim-bookworm
ENV PATH=/opt/agentmesh/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/agentmesh /opt/agentmesh
# A fixed numeric uid, so that orchestrators can check runAsNonRoot.
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin agentmesh
USER 10001:10001
WORKDIR /home/agentmesh
ENTRYPOINT ["agentmesh"]
CMD ["--help"]
