"""stdlib logging: JSON when not on a terminal, context fields from `extra`."""

from __future__ import annotations

import json
import logging
import os
import sys

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class ContextFilter(logging.Filter):
    """Stamps every record with the process's service and node."""

    def __init__(self, service: str, node: str) -> None:
        super().__init__()
        self.service, self.node = service, node

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        record.node = self.node
        return True


def setup(service: str, node: str, level: str | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if sys.stderr.isatty():
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter(service, node))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level or os.environ.get("AGENTMESH_LOG_LEVEL", "INFO"))
