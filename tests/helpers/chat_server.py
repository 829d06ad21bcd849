"""A real HTTP server on loopback speaking OpenAI's chat completions API (stdlib only).

``POST /v1/chat/completions`` answers with the next scripted ``Reply`` (default: an answer
naming the model, temperature and max_tokens it was asked for, and echoing the last user
message), as JSON or, for ``"stream": true``, as server-sent events in a chunked response,
as vLLM, TGI and Ollama send them. Every request body is kept in ``requests``.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Reply:
    """What the server does with one request.

    ``status`` other than 200 answers with an OpenAI error body. ``delay_s`` waits before
    answering. A stream sends ``chunks`` (default: the answer's words); then, with
    ``error_event``, an SSE error event (as vLLM reports a failure mid-stream), or with
    ``cut``, closes the connection mid-body; otherwise ``[DONE]``.
    """

    status: int = 200
    text: str | None = None
    delay_s: float = 0.0
    chunks: tuple[str, ...] | None = None
    chunk_delay_s: float = 0.0
    error_event: bool = False
    cut: bool = False


class ChatServer:
    """``with ChatServer() as server:`` … ``server.base_url`` is the ``/v1`` URL."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.hung_up = threading.Event()  # a client closed a stream before its end
        self._script: deque[Reply] = deque()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                if self.path != "/v1/chat/completions":
                    self._json(404, {"error": {"message": f"no route {self.path}"}})
                    return
                with server._lock:
                    server.requests.append(body)
                    reply = server._script.popleft() if server._script else Reply()
                time.sleep(reply.delay_s)
                if reply.status != 200:
                    self._json(reply.status, _error(reply.status))
                elif body.get("stream"):
                    self._stream(body, reply)
                else:
                    self._json(200, _completion(body, _text(body, reply)))

            def _json(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, body: dict[str, Any], reply: Reply) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                pieces = reply.chunks
                if pieces is None:
                    words = _text(body, reply).split(" ")
                    pieces = tuple(w if i == 0 else " " + w for i, w in enumerate(words))
                try:
                    for piece in pieces:
                        self._event(_chunk(body, {"role": "assistant", "content": piece}, None))
                        time.sleep(reply.chunk_delay_s)
                except ConnectionError:
                    server.hung_up.set()
                    raise
                if reply.cut:
                    self.wfile.write(b'40\r\ndata: {"id": "chatcmpl-1", "obj')  # half a chunk
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if reply.error_event:
                    self._event({"error": {"message": "the engine died", "code": 500}})
                else:
                    self._event(_chunk(body, {}, "stop"))
                    self._send(b"data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")

            def _event(self, payload: dict[str, Any]) -> None:
                self._send(b"data: " + json.dumps(payload).encode() + b"\n\n")

            def _send(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

        self._server = _Server((HOST, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self._server.server_address[1]}/v1"

    def script(self, *replies: Reply) -> None:
        """Answer the next requests with these replies, in order (then the default)."""
        with self._lock:
            self._script.extend(replies)

    def __enter__(self) -> ChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (a cancelled call, a cut stream) is not the server's error."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _text(body: dict[str, Any], reply: Reply) -> str:
    if reply.text is not None:
        return reply.text
    last = body["messages"][-1]["content"]
    return f"[{body['model']} t={body.get('temperature')} max={body.get('max_tokens')}] {last}"


def _completion(body: dict[str, Any], text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }


def _chunk(body: dict[str, Any], delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _error(status: int) -> dict[str, Any]:
    kinds = {429: "rate_limit_exceeded", 500: "server_error", 400: "invalid_request_error"}
    return {
        "error": {
            "message": f"scripted HTTP {status}",
            "type": kinds.get(status, "error"),
            "code": status,
        }
    }
