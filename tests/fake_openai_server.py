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

The Files and Batches endpoints of the Batch API: ``POST /v1/files`` (multipart upload),
``GET /v1/files/<id>`` and ``/v1/files/<id>/content``, ``POST /v1/batches``, ``GET /v1/batches/<id>``
and ``POST /v1/batches/<id>/cancel``. A created batch checks its input file's lines (a bad line fails the
batch, as the API's validation does) and is ``validating``; each retrieve moves it on: ``in_progress``
(and it stays there while ``batch_hold`` is true), then it ends as ``batch_outcome`` says. When it ends,
its requests are answered as the chat endpoint answers them (same markers and faults; ``429``, ``500``
and ``hang`` give an error-file line with that status, ``badbody`` a status 200 body without choices),
and the output and error files are written. ``expired`` answers the first ``batch_partial`` requests and
puts the others in the error file with ``batch_expired``; ``cancelled`` (also after a cancel call)
answers the first ``batch_partial`` and leaves the others out; ``failed`` fails the batch. Every call is
in ``api_calls`` as ``(operation, id)``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from email import policy
from email.parser import BytesParser
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
        # The Batch API's script, set by the tests as attributes (see the module docstring)
        self.batch_outcome = "completed"
        self.batch_partial = 0
        self.batch_hold = False
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self.api_calls: list[tuple[str, str]] = []
        self._lock = threading.RLock()  # the Batch API answers chat requests under it
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
                    fake._batch_api(self, b"")

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

    def calls(self, operation: str) -> list[str]:
        """The ids the Batch API calls of ``operation`` (e.g. ``batches.create``) were about, in order."""
        with self._lock:
            return [i for op, i in self.api_calls if op == operation]

    # ------------------------------------------------------------------ serving
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        raw = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        if h.path.rstrip("/") != "/v1/chat/completions":
            return self._batch_api(h, raw)
        try:
            body = json.loads(raw)
            _user(body)
        except (ValueError, KeyError, StopIteration):
            return self._send(h, 400, {"error": {"message": "bad request body"}})
        rec = self._record(body, "http")
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
        if rec["fault"] == "hang":
            self._stop.wait(self.hang_s)
            rec["status"] = None  # the client has given up by now
            return self._send(h, 500, {"error": {"message": "too late"}})
        status, payload, headers = self._complete(body, rec)
        if isinstance(payload, bytes):
            return self._send_raw(h, status, payload)
        self._send(h, status, payload, headers)

    def _record(self, body: dict, via: str) -> dict:
        """Log a chat request (``via`` http or batch) and take its next scripted fault."""
        user = _user(body)
        kind = "listwise" if "[Response 1]" in user else "rubric"
        if kind == "rubric":
            m = _CID.search(user)
        else:
            m = _QID.search(user)
        content_id = m.group(1) if m else "?"
        rec = {
            "t": time.monotonic(),
            "via": via,
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
        return rec

    def _complete(self, body: dict, rec: dict) -> tuple[int, dict | bytes, dict | None]:
        """The status, body and headers of the answer to a logged chat request."""
        fault, kind, user = rec["fault"], rec["kind"], _user(body)
        if fault == "429":
            rec["status"] = 429
            return (
                429,
                {"error": {"message": "Rate limit reached", "type": "rate_limit"}},
                {"Retry-After": self.retry_after},
            )
        if fault in ("500", "hang"):
            rec["status"] = 500
            return 500, {"error": {"message": "internal error"}}, None
        if fault == "badbody":
            return 200, b'{"id": "chatcmpl-x", "choices": [{"index": 0, "mess', None

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
        return (
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
            None,
        )

    # ------------------------------------------------------------------ the Batch API
    def _batch_api(self, h: BaseHTTPRequestHandler, raw: bytes) -> None:
        if h.headers.get("Authorization") != f"Bearer {self.api_key}":
            msg = f"Incorrect API key provided: {h.headers.get('Authorization')}"
            return self._send(h, 401, {"error": {"message": msg, "code": "invalid_api_key"}})
        parts = h.path.split("?")[0].strip("/").split("/")[1:]  # after "v1"
        route = (h.command, *parts[:1], *parts[2:])
        with self._lock:
            if route == ("POST", "files"):
                return self._send(h, 200, self._upload(h, raw))
            if route == ("POST", "batches"):
                return self._send(h, 200, self._create(json.loads(raw)))
            obj = (self.files if parts[0] == "files" else self.batches).get(parts[1]) if len(parts) > 1 else None
            if obj is None:
                return self._send(h, 404, {"error": {"message": f"no such object: {h.path}"}})
            if route == ("GET", "files", "content"):
                self.api_calls.append(("files.content", obj["id"]))
                return self._send_raw(h, 200, obj["data"])
            if route == ("GET", "files"):
                return self._send(h, 200, {k: v for k, v in obj.items() if k != "data"})
            if route == ("GET", "batches"):
                self.api_calls.append(("batches.retrieve", obj["id"]))
                self._advance(obj)
                return self._send(h, 200, obj)
            if route == ("POST", "batches", "cancel"):
                self.api_calls.append(("batches.cancel", obj["id"]))
                if obj["status"] in ("validating", "in_progress"):
                    obj["status"] = "cancelling"
                return self._send(h, 200, obj)
        return self._send(h, 404, {"error": {"message": f"no route {h.command} {h.path}"}})

    def _new_file(self, data: bytes, purpose: str, filename: str) -> dict:
        fid = f"file-{len(self.files) + 1}"
        self.files[fid] = {
            "id": fid,
            "object": "file",
            "bytes": len(data),
            "created_at": 0,
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "data": data,
        }
        return self.files[fid]

    def _upload(self, h: BaseHTTPRequestHandler, raw: bytes) -> dict:
        head = f"Content-Type: {h.headers.get('Content-Type')}\r\n\r\n".encode()
        form = BytesParser(policy=policy.HTTP).parsebytes(head + raw)
        fields = {p.get_param("name", header="content-disposition"): p for p in form.iter_parts()}
        part = fields["file"]
        f = self._new_file(part.get_payload(decode=True), fields["purpose"].get_content().strip(), part.get_filename())
        self.api_calls.append(("files.create", f["id"]))
        return {k: v for k, v in f.items() if k != "data"}

    def _create(self, req: dict) -> dict:
        bid = f"batch_{len(self.batches) + 1}"
        self.api_calls.append(("batches.create", bid))
        b = {
            "id": bid,
            "object": "batch",
            "endpoint": req["endpoint"],
            "input_file_id": req["input_file_id"],
            "completion_window": req["completion_window"],
            "metadata": req.get("metadata"),
            "status": "validating",
            "created_at": 0,
            "output_file_id": None,
            "error_file_id": None,
            "errors": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
        }
        self.batches[bid] = b
        f = self.files.get(req["input_file_id"])
        problem = "no such input file" if f is None or f["purpose"] != "batch" else None
        lines = f["data"].decode().splitlines() if problem is None else []
        ids: set[str] = set()
        for n, line in enumerate(lines, 1):
            try:
                item = json.loads(line)
                assert set(item) == {"custom_id", "method", "url", "body"}, f"keys {sorted(item)}"
                assert item["method"] == "POST" and item["url"] == req["endpoint"], "method or url"
                assert item["custom_id"] not in ids, "duplicate custom_id"
                assert item["body"]["model"] and _user(item["body"]), "body"
                ids.add(item["custom_id"])
            except (ValueError, AssertionError, KeyError, TypeError, StopIteration) as e:
                problem = f"line {n}: {e}"
                break
        if problem is not None or self.batch_outcome == "failed":
            msg = problem or "The model is not available for batch requests."
            b.update(status="failed", errors={"object": "list", "data": [{"code": "invalid_request", "message": msg}]})
        b["request_counts"]["total"] = len(lines)
        return b

    def _advance(self, b: dict) -> None:
        """One retrieve's worth of progress: validating -> in_progress -> (unless held) the outcome."""
        if b["status"] == "validating":
            b["status"] = "in_progress"
        elif b["status"] == "in_progress" and not self.batch_hold:
            self._finish(b, self.batch_outcome)
        elif b["status"] == "cancelling":
            self._finish(b, "cancelled")

    def _finish(self, b: dict, outcome: str) -> None:
        lines = [json.loads(x) for x in self.files[b["input_file_id"]]["data"].decode().splitlines()]
        done = len(lines) if outcome == "completed" else self.batch_partial
        out, err = [], []
        for n, item in enumerate(lines):
            line = {"id": f"batch_req_{n}", "custom_id": item["custom_id"], "response": None, "error": None}
            if n >= done:
                if outcome == "expired":
                    msg = "This request could not be executed before the completion window expired."
                    err.append({**line, "error": {"code": "batch_expired", "message": msg}})
                continue
            rec = self._record(item["body"], "batch")
            status, payload, _ = self._complete(item["body"], rec)
            if isinstance(payload, bytes):  # a status 200 body that is not a chat completion
                payload = {"id": "chatcmpl-x", "object": "chat.completion", "choices": []}
            line["response"] = {"status_code": status, "request_id": f"req_{n}", "body": payload}
            (out if status == 200 else err).append(line)
        for key, rows in (("output_file_id", out), ("error_file_id", err)):
            data = "".join(json.dumps(r) + "\n" for r in rows).encode()
            b[key] = self._new_file(data, "batch_output", f"{b['id']}_{key}.jsonl")["id"] if rows else None
        b["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(err)}
        b["status"] = outcome

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


def _user(body: dict) -> str:
    return next(m["content"] for m in body["messages"] if m["role"] == "user")


if __name__ == "__main__":  # manual use: python tests/fake_openai_server.py
    with FakeOpenAI() as srv:
        print(f"serving {srv.base_url} (key sk-test-key); Ctrl-C to stop", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
