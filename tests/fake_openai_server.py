"""A small Chat Completions server on 127.0.0.1 for the LLM judge tests (stdlib only).

It answers ``POST /v1/chat/completions`` like an OpenAI-compatible endpoint, judging by markers the
tests put into the texts: a candidate containing ``q=<1-5>`` deserves that rubric score; a candidate's
``cid=<id>`` and a question's ``qid=<id>`` name the request (``content_id``: the candidate for a
rubric request, the question for a listwise one), so that requests can be counted per content. It also
answers vLLM's readiness probe, ``GET /health``, and listens on ``port`` (0: a free one).

Faults are scripted per content id, consumed one per request in order: ``429`` (with ``Retry-After``),
``500``, ``hang`` (no answer before the client's timeout), ``badbody`` (a truncated JSON body),
``prose`` (an answer without a score), ``range`` (a score of 7), ``textscore`` (plain ``Score: N``,
valid through the tolerant parser). ``listwise_policy="first"`` makes a judge that always prefers the
first candidate shown (and rejects the last), for the position-bias test. A wrong ``Authorization``
header gets a 401 whose message echoes the header, as a careless server might, to test redaction.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_CID = re.compile(r"\bcid=([\w.-]+)")
_QID = re.compile(r"\bqid=([\w.-]+)")
_Q = re.compile(r"\bq=(\d+)")
_BLOCK = re.compile(r"\[Response (\d+)\]\n(.*?)\n\[End of Response \1\]", re.DOTALL)
_RUBRIC_RESPONSE = re.compile(r"Response:\n<<<\n(.*)\n>>>", re.DOTALL)


class FakeOpenAI:
    def __init__(
        self,
        api_key: str = "sk-test-key",
        *,
        delay: float = 0.0,
        faults: dict[str, list[str]] | None = None,
        listwise_policy: str = "content",
        reject_structured: bool = False,
        hang_s: float = 3.0,
        retry_after: str = "1",
        port: int = 0,
    ):
        self.api_key = api_key
        self.delay = delay
        self.faults = {k: list(v) for k, v in (faults or {}).items()}
        self.listwise_policy = listwise_policy
        self.reject_structured = reject_structured
        self.hang_s = hang_s
        self.retry_after = retry_after
        self.port = port
        self.log: list[dict] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FakeOpenAI:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):  # noqa: N802 - http.server API
                fake._handle(self)

            def do_GET(self):  # noqa: N802 - http.server API
                # vLLM's readiness probe, for a stand-in of its server (tests/standin_vllm_server.py)
                if self.path == "/health":
                    fake._send_raw(self, 200, b"")
                else:
                    fake._send(self, 404, {"error": {"message": f"no route {self.path}"}})

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    # ------------------------------------------------------------------ counting
    def mark(self) -> int:
        with self._lock:
            return len(self.log)

    def requests(self, since: int = 0) -> list[dict]:
        with self._lock:
            return list(self.log[since:])

    def counts(self, since: int = 0) -> Counter:
        return Counter(r["content_id"] for r in self.requests(since))

    def answered(self, since: int = 0) -> Counter:
        return Counter(r["content_id"] for r in self.requests(since) if r["answered"])

    # ------------------------------------------------------------------ serving
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        t0 = time.monotonic()
        raw = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        if h.path.rstrip("/") != "/v1/chat/completions":
            return self._send(h, 404, {"error": {"message": f"no route {h.path}"}})
        try:
            body = json.loads(raw)
            user = next(m["content"] for m in body["messages"] if m["role"] == "user")
        except (ValueError, KeyError, StopIteration):
            return self._send(h, 400, {"error": {"message": "bad request body"}})
        kind = "listwise" if "[Response 1]" in user else "rubric"
        if kind == "rubric":
            m = _CID.search(user)
        else:
            m = _QID.search(user)
        content_id = m.group(1) if m else "?"
        rec = {
            "t": t0,
            "content_id": content_id,
            "model": body.get("model"),
            "kind": kind,
            "structured": "response_format" in body,
            "temperature": body.get("temperature"),
            "max_tokens": body.get("max_tokens"),
            "fault": None,
            "status": 200,
            "answered": False,
        }
        with self._lock:
            self.log.append(rec)
            queue = self.faults.get(content_id)
            fault = queue.pop(0) if queue else None
        rec["fault"] = fault

        if h.headers.get("Authorization") != f"Bearer {self.api_key}":
            rec["status"] = 401
            return self._send(
                h,
                401,
                {
                    "error": {
                        "message": f"Incorrect API key provided: {h.headers.get('Authorization')}",
                        "type": "invalid_request_error",
                        "code": "invalid_api_key",
                    }
                },
            )
        if self.reject_structured and rec["structured"]:
            rec["status"] = 400
            return self._send(h, 400, {"error": {"message": "response_format of type json_schema is not supported"}})
        if self.delay:
            self._stop.wait(self.delay)
        if fault == "429":
            rec["status"] = 429
            return self._send(
                h,
                429,
                {"error": {"message": "Rate limit reached", "type": "rate_limit"}},
                {"Retry-After": self.retry_after},
            )
        if fault == "500":
            rec["status"] = 500
            return self._send(h, 500, {"error": {"message": "internal error"}})
        if fault == "hang":
            self._stop.wait(self.hang_s)
            rec["status"] = None  # the client has given up by now
            return self._send(h, 500, {"error": {"message": "too late"}})
        if fault == "badbody":
            return self._send_raw(h, 200, b'{"id": "chatcmpl-x", "choices": [{"index": 0, "mess')

        if kind == "rubric":
            cm = _RUBRIC_RESPONSE.search(user)
            q = _Q.search(cm.group(1)) if cm else None
            score = int(q.group(1)) if q else 3
            content = json.dumps({"score": score})
        else:
            blocks = [(int(k), text) for k, text in _BLOCK.findall(user)]
            qs = [int(_Q.search(t).group(1)) if _Q.search(t) else 3 for _, t in blocks]
            n = len(blocks)
            if self.listwise_policy == "first":
                content = json.dumps({"best": 1, "worst": n, "all_equal": False})
            elif len(set(qs)) == 1:
                content = json.dumps({"best": 1, "worst": 2, "all_equal": True})
            else:
                best = max(range(n), key=lambda i: (qs[i], -i)) + 1
                worst = min(range(n), key=lambda i: (qs[i], -i)) + 1
                content = json.dumps({"best": best, "worst": worst, "all_equal": False})
        if fault == "prose":
            content = "This response looks reasonable to me."
        elif fault == "range":
            content = (
                json.dumps({"score": 7})
                if kind == "rubric"
                else json.dumps({"best": 99, "worst": 1, "all_equal": False})
            )
        elif fault == "textscore":
            content = f"Score: {json.loads(content).get('score', 3)}"
        rec["answered"] = fault in (None, "textscore")
        prompt_tokens = sum(len(m["content"]) for m in body["messages"]) // 4
        self._send(
            h,
            200,
            {
                "id": f"chatcmpl-{len(self.log)}",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model"),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": len(content) // 4 + 1,
                    "total_tokens": prompt_tokens + len(content) // 4 + 1,
                },
            },
        )

    def _send(self, h, status: int, obj: dict, headers: dict | None = None) -> None:
        self._send_raw(h, status, json.dumps(obj).encode(), headers)

    @staticmethod
    def _send_raw(h, status: int, data: bytes, headers: dict | None = None) -> None:
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass


if __name__ == "__main__":  # manual use: python tests/fake_openai_server.py
    with FakeOpenAI() as srv:
        print(f"serving {srv.base_url} (key sk-test-key); Ctrl-C to stop", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
