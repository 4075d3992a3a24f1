"""JSON over HTTP to one SGLang server: the call, its error, the wait for an attached server to answer, and the
reading of a reply's success flag and weight version."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Optional


class SGLangServerError(RuntimeError):
    """The SGLang server failed, refused a request or could not be (re)started; the message says which."""


class HTTPClient:
    """JSON over HTTP to one SGLang server, with its API key."""

    def __init__(self, url: str, api_key: Optional[str]):
        self.url = url.rstrip("/")
        self.api_key = api_key

    def call(self, path: str, payload: Optional[dict[str, Any]] = None, timeout: float = 600.0,
             method: Optional[str] = None) -> Any:
        """The decoded JSON reply of POST (or GET without payload) url+path; SGLangServerError on HTTP errors."""
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method or ("GET" if data is None else "POST"))
        req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            raise SGLangServerError(f"{path}: HTTP {e.code}: {e.read()[:2000].decode(errors='replace')}") from None
        if not body:
            return None
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            return body.decode(errors="replace")

    def wait_answering(self, timeout_s: float) -> float:
        """Seconds until the server answered GET /health, asked with back-off for up to timeout_s
        (rollout.sglang.startup_timeout_s): a replica started beside the trainer may still be loading."""
        last: list[Exception] = []

        def answers() -> bool:
            try:
                self.call("/health", timeout=30)
                return True
            except (SGLangServerError, OSError) as e:  # OSError: refused, unreachable, reset (URLError is one)
                last[:] = [e]
                return False

        return backoff_until(answers, timeout_s, lambda waited: (
            f"the SGLang server at {self.url} did not answer /health within {waited:.0f} s "
            f"(rollout.sglang.startup_timeout_s={timeout_s:g}); last error: {last[0]}"))


def backoff_until(ready: Callable[[], bool], limit_s: float, failure: Callable[[float], str]) -> float:
    """Seconds until ready() is true, asked with back-off (0.5 s doubling to 10 s); SGLangServerError with
    failure(seconds waited) once the next pause would pass limit_s."""
    start, pause = time.monotonic(), 0.5
    while not ready():
        waited = time.monotonic() - start
        if waited + pause > limit_s:
            raise SGLangServerError(failure(waited))
        time.sleep(pause)
        pause = min(2 * pause, 10.0)
    return time.monotonic() - start


def check_reply(reply: Any, path: str) -> None:
    """Raise when an update call reports failure (HTTP 200 with success false, or a refused call)."""
    if isinstance(reply, dict) and reply.get("success") is False:
        raise SGLangServerError(f"{path} failed: {reply.get('message')}")


def reply_version(raw: Any) -> int:
    """The weight version a server reports as an int (0 for its initial version, "default")."""
    try:
        return int(raw)
    except (TypeError, ValueError):
        return 0
