"""Escalation webhook: POST one JSON object to the operator's endpoint (called from a retried Celery task)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from vmq.errors import VmqError


class NotifyError(VmqError):
    """The webhook did not accept the notification (network error or non-2xx status)."""


def post_json(url: str, payload: dict[str, Any], timeout_s: float = 5.0) -> int:
    """POST ``payload`` as JSON to ``url``; returns the HTTP status or raises NotifyError."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "vmq"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        raise NotifyError(f"webhook answered {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise NotifyError(f"webhook unreachable: {exc}") from exc
    if not 200 <= status < 300:
        raise NotifyError(f"webhook answered {status}")
    return status
