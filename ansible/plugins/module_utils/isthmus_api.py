# Copyright: Isthmus maintainers
# Apache License 2.0 (see the repository's pyproject.toml)
"""The operators' control API of an Isthmus appliance, for the collection's modules.

Every module takes the same connection options (`api_url`, `token` or `token_file`, `timeout`)
and talks JSON over HTTP with a bearer token. Errors carry the HTTP status and the API's own
message (`{"error": ..., "field": ...}`), so a task fails with what the appliance said.
"""

from __future__ import annotations

import json
import re

from ansible.module_utils.six.moves.urllib.error import HTTPError, URLError
from ansible.module_utils.urls import open_url

API_ARGUMENT_SPEC = dict(
    api_url=dict(type="str", default="http://127.0.0.1:15000"),
    token=dict(type="str", no_log=True),
    token_file=dict(type="path", default="/etc/isthmus/api-token"),
    timeout=dict(type="int", default=10),
)

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class IsthmusApiError(Exception):
    def __init__(self, status, message, field=None):
        self.status = status
        self.message = message
        self.field = field
        super().__init__(message)


def duration_seconds(value):
    """'1m30s' -> 90.0 (the appliance's duration syntax); None stays None."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    total, pos = 0.0, 0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError("%r is not a duration like 500ms, 5s, 1m30s, 1h" % (value,))
    return total


class IsthmusApi:
    """A client for one appliance's control API."""

    def __init__(self, module):
        self.module = module
        params = module.params
        self.base = params["api_url"].rstrip("/")
        self.timeout = params["timeout"]
        token = params.get("token")
        if not token:
            path = params["token_file"]
            try:
                with open(path) as f:
                    token = f.read().strip()
            except OSError as e:
                module.fail_json(msg="cannot read the API token file %s: %s" % (path, e))
            if not token:
                module.fail_json(msg="the API token file %s is empty" % path)
        self.token = token

    def request(self, method, path, body=None):
        """(status, parsed JSON body or None). 4xx/5xx raise IsthmusApiError, except a 404 on
        GET, which returns (404, None): "not there" is an answer, not an error."""
        data = None
        headers = {"Authorization": "Bearer %s" % self.token, "Accept": "application/json"}
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        try:
            resp = open_url(self.base + path, method=method, data=data, headers=headers,
                            timeout=self.timeout, validate_certs=True, follow_redirects="none")
            status, raw = resp.getcode(), resp.read()
        except HTTPError as e:
            status, raw = e.code, e.read()
            if status == 404 and method == "GET":
                return 404, None
            message, field = _error_of(raw, e)
            raise IsthmusApiError(status, "%s %s: HTTP %s: %s" % (method, path, status, message),
                                  field) from None
        except URLError as e:
            raise IsthmusApiError(None, "%s %s: cannot reach the control API at %s: %s"
                                  % (method, path, self.base, e.reason)) from None
        except OSError as e:
            raise IsthmusApiError(None, "%s %s: %s" % (method, path, e)) from None
        if not raw:
            return status, None
        try:
            return status, json.loads(raw)
        except ValueError:
            raise IsthmusApiError(status, "%s %s: the API answered something other than JSON"
                                  % (method, path)) from None


def _error_of(raw, exc):
    try:
        body = json.loads(raw)
    except (ValueError, TypeError):
        return str(exc.reason), None
    if isinstance(body, dict):
        return str(body.get("error", exc.reason)), body.get("field")
    return str(exc.reason), None
