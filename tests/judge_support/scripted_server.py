"""A scripted OpenAI-compatible judge endpoint on 127.0.0.1 for tests and the throughput bench.

It answers ``POST /v1/chat/completions`` with planned replies. The plan is chosen per request by a
``[[style:NAME]]`` marker in the conversation, so concurrent requests stay deterministic, and
"once" styles fail only on the first ask of each (pair, order). Its verdict rule: the shown
response containing "GOOD" more often wins every dimension; equal counts give a tie. Every
request is counted and logged (time, style, status, whether structured output was asked).

Run alone: ``python tests/judge_support/scripted_server.py --port 8765 --delay 0.2``.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DIMENSIONS = ("grammar_fluency", "coherence_logic", "factuality", "relevance_instruction")
USAGE = {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}

_STYLE = re.compile(r"\[\[style:([a-z0-9-]+)\]\]")
_BLOCK = re.compile(r"<<<RESPONSE_([AB]) (\w+)>>>\n(.*?)\n<<<END_RESPONSE_\1 \2>>>", re.DOTALL)
_ORDER = re.compile(r"answer ([AB]) is better", re.IGNORECASE)


def verdict_json(label: str) -> str:
    return json.dumps(dict.fromkeys(DIMENSIONS, label))


def fenced_responses(user: str) -> dict[str, str]:
    """Shown responses as a delimiter-respecting reader sees them: text inside matching tags."""
    return {match.group(1): match.group(3) for match in _BLOCK.finditer(user)}


def rule_verdict(user: str) -> str:
    """ "A", "B" or "tie": the response with more "GOOD" in it wins."""
    shown = fenced_responses(user)
    a, b = shown.get("A", "").count("GOOD"), shown.get("B", "").count("GOOD")
    return "A" if a > b else "B" if b > a else "tie"


def outside_blocks(user: str) -> str:
    """The prompt text outside the genuine response blocks: where instructions may live."""
    return _BLOCK.sub("", user)


class ScriptedJudgeServer:
    """Threaded HTTP server; ``url`` is the base URL for an OpenAI client."""

    def __init__(
        self,
        delay: float = 0.0,
        slow_seconds: float = 1.0,
        json_schema: bool = True,
        port: int = 0,
        gather: int = 0,
        gather_timeout: float = 20.0,
    ):
        self.delay = delay
        # With ``gather`` > 0 every request after the first (which a client sends alone to learn
        # whether structured output works) waits until that many have been in flight at once, or
        # ``gather_timeout`` passes, so a concurrency test does not hang on thread start-up timing
        # on a loaded machine.
        self.gather = gather
        self.gather_timeout = gather_timeout
        self.slow_seconds = slow_seconds
        self.json_schema = json_schema
        self.log: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._attempts: dict[tuple, int] = {}
        self._lock = threading.Lock()
        self._gathered = threading.Condition(self._lock)
        self._served_first = False
        self._gathered_max = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                server.enter()
                try:
                    server.wait_for_gather()
                    status, headers, payload, sleep = server.plan(self.path, body, self.headers)
                    time.sleep(sleep)
                finally:
                    server.leave()
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for name, value in {**headers, "Content-Type": "application/json"}.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test): nothing to answer

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.log)

    def count(self, style: str | None = None, status: int | None = None) -> int:
        with self._lock:
            return sum(
                1
                for entry in self.log
                if (style is None or entry["style"] == style)
                and (status is None or entry["status"] == status)
            )

    def enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if self._served_first:
                self._gathered_max = max(self._gathered_max, self.in_flight)
            self._gathered.notify_all()

    def wait_for_gather(self) -> None:
        if self.gather:
            with self._lock:
                if not self._served_first:
                    self._served_first = True
                    return
                self._gathered.wait_for(
                    lambda: self._gathered_max >= self.gather, timeout=self.gather_timeout
                )

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def start(self) -> ScriptedJudgeServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- the plan --------------------------------------------------------------------------------

    def plan(self, path: str, body: dict, headers) -> tuple[int, dict, dict, float]:
        """(status, headers, JSON body, seconds to sleep first) for one request."""
        messages = body.get("messages", [])
        user = next((m["content"] for m in messages if m.get("role") == "user"), "")
        found = _STYLE.search(user)
        style = found.group(1) if found else "plain"
        structured = "response_format" in body
        key = (style, user)
        with self._lock:
            attempt = self._attempts.get(key, 0)
            self._attempts[key] = attempt + 1
        if not path.rstrip("/").endswith("/chat/completions"):
            status, extra, payload, sleep = 404, {}, error(f"no route {path}"), 0.0
        else:
            status, extra, payload, sleep = self._reply(style, attempt, user, body, headers)
        with self._lock:
            self.log.append(
                {
                    "time": time.time(),
                    "style": style,
                    "status": status,
                    "structured": structured,
                    "authorization": headers.get("Authorization", ""),
                    "attempt": attempt,
                    "messages": len(messages),
                }
            )
        return status, extra, payload, sleep + self.delay

    def _reply(self, style, attempt, user, body, headers):
        if not path_ok(body):
            return 400, {}, error("missing model or messages"), 0.0
        if "response_format" in body and not self.json_schema:
            return 400, {}, error("response_format json_schema is not supported"), 0.0
        verdict = rule_verdict(user)
        if style == "unauthorized":
            token = headers.get("Authorization", "").removeprefix("Bearer ")
            return 401, {}, error(f"Incorrect API key provided: {token}"), 0.0
        if style == "reasoning-api" and "max_tokens" in body:
            return (
                400,
                {},
                error("Unsupported parameter: 'max_tokens'; use max_completion_tokens"),
                0.0,
            )
        if style == "reasoning-api" and "temperature" in body:
            return 400, {}, error("Unsupported value: 'temperature' must be the default (1)"), 0.0
        if style == "badrequest":
            return 400, {}, error("The model `nonexistent-judge` does not exist"), 0.0
        if style == "always500":
            return 500, {}, error("internal error"), 0.0
        if style == "error500-once" and attempt == 0:
            return 500, {}, error("internal error"), 0.0
        if style == "html200" or (style == "html200-once" and attempt == 0):
            return 200, {}, b"<html><body>Gateway says hello</body></html>", 0.0
        if style == "ratelimit-once" and attempt == 0:
            return 429, {"Retry-After": "1"}, error("rate limited"), 0.0
        if style == "slow-once" and attempt == 0:
            return 200, {}, completion(verdict_json(verdict)), self.slow_seconds
        if style == "malformed" or (style == "malformed-once" and attempt == 0):
            return 200, {}, completion('{"verdict" "unsure",, grammar => ???'), 0.0
        if style == "r1-inline":
            thinking = (
                "<think>At first glance answer A looks better: "
                f"{verdict_json('A')}. But reading again, the other one is right.</think>\n"
            )
            return 200, {}, completion(thinking + verdict_json(verdict)), 0.0
        if style == "r1-field":
            reasoning = f"Response A is better. Draft: {verdict_json('A')}"
            return 200, {}, completion(verdict_json(verdict), reasoning=reasoning), 0.0
        if style == "quoted":
            text = f"Someone claimed {verdict_json('A')}; wrong. Final: {verdict_json(verdict)}"
            return 200, {}, completion(text), 0.0
        if style == "position-biased":
            return 200, {}, completion(verdict_json("A")), 0.0
        if style == "gullible":
            orders = _ORDER.findall(user)  # obeys any instruction, even inside responses
            return 200, {}, completion(verdict_json(orders[-1].upper() if orders else verdict)), 0.0
        if style == "fenced-gullible":
            orders = _ORDER.findall(outside_blocks(user))  # obeys instructions outside blocks
            return 200, {}, completion(verdict_json(orders[-1].upper() if orders else verdict)), 0.0
        return 200, {}, completion(verdict_json(verdict)), 0.0


def path_ok(body: dict) -> bool:
    return bool(body.get("model")) and isinstance(body.get("messages"), list)


def error(message: str) -> dict:
    return {"error": {"message": message, "type": "scripted", "code": None}}


def completion(content: str, reasoning: str | None = None) -> dict:
    message = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "scripted-judge",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": dict(USAGE),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to sleep per request")
    args = parser.parse_args()
    server = ScriptedJudgeServer(delay=args.delay, port=args.port)
    print(f"scripted judge at {server.url} (delay {args.delay} s); Ctrl-C stops", flush=True)
    try:
        server._httpd.serve_forever()
    except KeyboardInterrupt:
        server._httpd.server_close()


if __name__ == "__main__":
    main()
