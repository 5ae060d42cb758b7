"""Judging through any OpenAI-compatible ``/v1/chat/completions`` endpoint, with concurrency.

Works unchanged against vLLM, SGLang, llama.cpp's server and hosted APIs. The client's own
retries are off; this module retries transient failures itself (see ``backoff``) so every retry
is counted. Structured output (``response_format`` with a JSON schema) is tried first; an
endpoint that rejects it with HTTP 400/404/422 is remembered and asked in plain text instead,
read with the tolerant parser. Likewise ``max_tokens`` becomes ``max_completion_tokens`` and
``temperature`` is dropped where a hosted reasoning model refuses them. The API key is held
privately and scrubbed from every message.
"""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit, urlunsplit

import openai

from hialign.judge.backoff import RetryPolicy, is_retryable_status, retry_after_seconds
from hialign.judge.base import DoneCallback, Judge, JudgeCall
from hialign.judge.cache import JudgeCache
from hialign.judge.items import OrderVerdict
from hialign.judge.parsing import final_answer, parse_verdict
from hialign.judge.prompts import TEMPLATE_VERSION, judge_messages, reask_message, verdict_schema

logger = logging.getLogger(__name__)

# Statuses with which an endpoint refuses an optional parameter (response_format, ...).
_PARAMETER_REJECTIONS = (400, 404, 422)
_REDACTED = "[redacted]"


class JudgeEndpointError(RuntimeError):
    """The endpoint refused a request, or kept failing after every retry."""


def public_url(url: str) -> str:
    """The URL without credentials, query or fragment, safe for names, logs and reports."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def _server_message(err: openai.APIStatusError) -> str:
    body = err.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return str(inner.get("message") or inner)
        return str(inner)
    if body is not None:
        return str(body)
    return err.response.text[:500]


class OpenAIJudge(Judge):
    """A judge model behind an OpenAI-compatible endpoint, ``concurrency`` requests in flight."""

    kind = "openai"
    template_version = TEMPLATE_VERSION

    def __init__(
        self,
        *,
        url: str,
        model: str,
        api_key: str | None,
        api_key_env: str,
        concurrency: int = 4,
        cache: JudgeCache | None = None,
        policy: RetryPolicy | None = None,
        parse_retries: int = 2,
        timeout: float = 120.0,
        max_tokens: int = 4096,
        temperature: float = 0.0,
        prices: dict | None = None,
    ):
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if parse_retries < 0:
            raise ValueError(f"parse_retries must be 0 or more, got {parse_retries}")
        self.url = url
        super().__init__(name=f"{model}@{public_url(url)}", model=model, cache=cache, prices=prices)
        self.concurrency = concurrency
        self.policy = policy or RetryPolicy()
        self.parse_retries = parse_retries
        self.timeout = timeout
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.api_key_env = api_key_env
        self.__api_key = api_key
        # What this endpoint accepts, learnt from its first answers (see ``_adapt``).
        self.structured_output: bool | None = None  # unknown until the endpoint first answers
        self.token_limit_field = "max_tokens"
        self.send_temperature = True
        self.adaptations: list[str] = []

    def decoding(self) -> dict:
        # Structured output is left out: it changes the reply's form, not the verdict asked for,
        # and it is only known after a request, which a finished re-run must not send.
        return {"temperature": self.temperature, "max_tokens": self.max_tokens}

    def describe(self) -> dict:
        described = super().describe()
        described["url"] = public_url(self.url)
        described["structured_output"] = self.structured_output
        described["adaptations"] = list(self.adaptations)
        return described

    def redact(self, text: str) -> str:
        """``text`` with the API key replaced, for anything that leaves this object."""
        key = self.__api_key
        # A key of one to three characters is no secret, and replacing it would garble the text.
        return text.replace(key, _REDACTED) if key and len(key) >= 4 else text

    # -- running calls ---------------------------------------------------------------------------

    def _run_calls(self, calls: list[JudgeCall], done: DoneCallback) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(self._run_all(calls, done))
            return
        # Called from inside an event loop (a notebook): run ours on a thread of its own.
        with ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(asyncio.run, self._run_all(calls, done)).result()

    async def _run_all(self, calls: list[JudgeCall], done: DoneCallback) -> None:
        client = openai.AsyncOpenAI(
            base_url=self.url,
            api_key=self.__api_key or "no-key",
            max_retries=0,
            timeout=self.timeout,
        )
        queue = iter(calls)
        try:
            if self.structured_output is None:
                # The first call runs alone: it finds out whether structured output works.
                first = next(queue)
                done(first, await self._ask(client, first))

            async def worker() -> None:
                for call in queue:  # one shared iterator: each call goes to exactly one worker
                    done(call, await self._ask(client, call))

            workers = [asyncio.create_task(worker()) for _ in range(self.concurrency)]
            try:
                await asyncio.gather(*workers)
            except BaseException:
                for task in workers:
                    task.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                raise
        finally:
            await client.close()

    async def _ask(self, client: openai.AsyncOpenAI, call: JudgeCall) -> OrderVerdict:
        """Ask for one order's verdict, re-asking up to ``parse_retries`` times if unreadable."""
        question = judge_messages(call.item, call.order)
        messages = question
        prompt_tokens = completion_tokens = 0
        for attempt in range(self.parse_retries + 1):
            reply = await self._request(client, messages)
            usage = getattr(reply, "usage", None)
            prompt_tokens += getattr(usage, "prompt_tokens", None) or 0
            completion_tokens += getattr(usage, "completion_tokens", None) or 0
            content = _content(reply)
            parsed = parse_verdict(content)
            if parsed.complete or attempt == self.parse_retries:
                break
            logger.debug(
                "unreadable verdict for %s/%s: %s",
                call.item.id,
                call.order,
                self.redact(parsed.reason or ""),
            )
            self._add("parse_reasks", 1)
            answer = final_answer(content)[-2000:] or "(no answer)"
            # Only the latest bad answer is shown back, so re-asks do not grow the context.
            messages = [*question, {"role": "assistant", "content": answer}, reask_message()]

        detail = {"structured_output": self.structured_output, "parse_method": parsed.method}
        if not parsed.complete:
            detail["invalid_reason"] = self.redact(parsed.reason or "unreadable")
            logger.warning(
                "%s order %s: no readable verdict after %d asks (%s)",
                call.item.id,
                call.order,
                attempt + 1,
                detail["invalid_reason"][:160],
            )
        return OrderVerdict(
            order=call.order,
            shown=parsed.shown,
            source="http",
            attempts=attempt + 1,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            detail=detail,
        )

    def _request_arguments(self, messages: list[dict]) -> dict:
        """Arguments of one chat completion, as far as this endpoint is known to accept them."""
        arguments = {"model": self.model, "messages": messages}
        arguments[self.token_limit_field] = self.max_tokens
        if self.send_temperature:
            arguments["temperature"] = self.temperature
        if self.structured_output is not False:
            arguments["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "pairwise_verdict", "schema": verdict_schema()},
            }
        return arguments

    def _adapt(self, status: int, message: str) -> bool:
        """Adjust to an endpoint that refused an optional parameter; False if none applies.

        Hosted reasoning models refuse ``max_tokens`` (they want ``max_completion_tokens``) or a
        ``temperature``; some servers refuse ``response_format``. Each change is made once and
        kept for the rest of the run.
        """
        if status not in _PARAMETER_REJECTIONS:
            return False
        lowered, where = message.lower(), public_url(self.url)
        if self.token_limit_field == "max_tokens" and "max_tokens" in lowered:
            self.token_limit_field = "max_completion_tokens"
            logger.info("%s refused max_tokens; sending max_completion_tokens", where)
        elif self.send_temperature and "temperature" in lowered:
            self.send_temperature = False
            logger.warning("%s refused temperature; using its default sampling", where)
        elif self.structured_output is None:
            self.structured_output = False
            logger.info(
                "%s refused structured output (HTTP %d: %s); asking in plain text",
                where, status, message[:120],
            )  # fmt: skip
        else:
            return False
        self.adaptations.append(f"HTTP {status}: {message[:120]}")
        return True

    async def _request(self, client: openai.AsyncOpenAI, messages: list[dict]):
        """One chat completion, retrying 408/429/5xx/timeouts with backoff; other 4xx raise."""
        retry = 0
        while True:
            arguments = self._request_arguments(messages)
            self._add("http_requests", 1)
            try:
                reply = await client.chat.completions.create(**arguments)
            except openai.APIStatusError as err:
                status = err.status_code
                message = self.redact(_server_message(err))
                if self._adapt(status, message):
                    continue
                if not is_retryable_status(status):
                    raise JudgeEndpointError(self._refusal(status, message)) from None
                wait_for = retry_after_seconds(err.response.headers)
                reason = f"HTTP {status}: {message[:200]}"
            except openai.APIConnectionError as err:
                wait_for = None
                kind = "timeout" if isinstance(err, openai.APITimeoutError) else "connection error"
                reason = f"{kind} after {self.timeout:g} s" if kind == "timeout" else kind
            except json.JSONDecodeError as err:  # e.g. a proxy's HTML page sent with HTTP 200
                wait_for = None
                reason = f"a success reply whose body is not JSON ({err.msg} at char {err.pos})"
            else:
                if "response_format" in arguments and self.structured_output is None:
                    logger.info("%s accepts structured output", public_url(self.url))
                    self.structured_output = True
                return reply

            if retry >= self.policy.max_retries:
                raise JudgeEndpointError(
                    f"judge endpoint {public_url(self.url)} still failing after "
                    f"{retry} retries: {reason}"
                ) from None
            delay = self.policy.delay(retry, wait_for)
            logger.info(
                "%s; retry %d/%d in %.2f s", reason, retry + 1, self.policy.max_retries, delay
            )
            self._add("retries", 1)
            retry += 1
            await asyncio.sleep(delay)

    def _refusal(self, status: int, message: str) -> str:
        text = (
            f"judge endpoint {public_url(self.url)} refused the request: HTTP {status}: {message}"
        )
        if status in (401, 403) and not self.__api_key:
            text += f" (no API key: environment variable {self.api_key_env} is unset)"
        return self.redact(text)

    def _add(self, counter: str, amount: int) -> None:
        with self._lock:
            self._counts[counter] += amount


def _content(reply) -> str | None:
    """The final answer text of a chat completion (reasoning fields are never read)."""
    choices = getattr(reply, "choices", None)
    if not choices:
        return reply if isinstance(reply, str) else None
    return choices[0].message.content
