"""``build_judge``: one entry point for the command line and the experiment runner."""

from __future__ import annotations

import logging
import math
import os

from hialign.judge.backoff import RetryPolicy
from hialign.judge.base import Judge
from hialign.judge.cache import JudgeCache

logger = logging.getLogger(__name__)


def _check_settings(concurrency, max_retries, parse_retries, timeout, max_tokens) -> None:
    """Refuse nonsensical numbers before any request; messages name the flags."""
    for flag, value, low in (
        ("--judge-concurrency", concurrency, 1),
        ("--judge-max-retries", max_retries, 0),
        ("--judge-parse-retries", parse_retries, 0),
        ("--judge-max-tokens", max_tokens, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{flag} must be an integer >= {low}, got {value!r}")
    if not isinstance(timeout, int | float) or not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"--judge-timeout must be a number of seconds > 0, got {timeout!r}")


def build_judge(
    *,
    url: str | None = None,
    model: str | None = None,
    api_key_env: str = "HIALIGN_JUDGE_API_KEY",
    concurrency: int = 4,
    cache_path: str | None = None,
    max_retries: int = 5,
    parse_retries: int = 2,
    timeout: float = 120.0,
    local_model: tuple | None = None,
    prices: dict | None = None,
    retry_base_delay: float = 1.0,
    max_tokens: int = 4096,
    local_settings=None,
) -> Judge:
    """A judge behind ``url`` (any OpenAI-compatible endpoint) or, without one, a local model.

    Args:
        url: base URL of an OpenAI-compatible API, e.g. ``http://127.0.0.1:8000/v1``.
        model: model name at the endpoint; without ``url``, a local model spec for
            ``load_model`` (None: the embedded SmolLM2-135M-Instruct).
        api_key_env: name of the environment variable holding the API key (may be unset for
            local servers). The key itself is never logged, cached or put in a message.
        concurrency: requests in flight against the endpoint.
        cache_path: SQLite file caching every judge call; None disables caching.
        max_retries: retries of HTTP 408/429/5xx and timeouts per request.
        parse_retries: re-asks after an unreadable verdict before it counts as invalid.
        timeout: seconds per HTTP request.
        local_model: an already loaded ``(model, tokenizer, display_name)`` for the local judge.
        prices: cost per million tokens, ``{"prompt": 0.55, "completion": 2.19}``.
        retry_base_delay: first backoff wait in seconds (doubles per retry, with jitter).
        max_tokens: completion cap per request (reasoning judges need room to think).
        local_settings: ``LocalJudgeSettings`` (token caps, batch size, precision).
    """
    _check_settings(concurrency, max_retries, parse_retries, timeout, max_tokens)
    cache = JudgeCache(cache_path) if cache_path else None
    if url:
        from hialign.judge.endpoint import OpenAIJudge

        if not model:
            raise ValueError("--judge-url needs --judge-model (the model name at the endpoint)")
        api_key = os.environ.get(api_key_env) or None
        if api_key is None:
            logger.info("environment variable %s is unset: sending no API key", api_key_env)
        return OpenAIJudge(
            url=url,
            model=model,
            api_key=api_key,
            api_key_env=api_key_env,
            concurrency=concurrency,
            cache=cache,
            policy=RetryPolicy(max_retries=max_retries, base_delay=retry_base_delay),
            parse_retries=parse_retries,
            timeout=timeout,
            max_tokens=max_tokens,
            prices=prices,
        )

    from hialign.judge.local import LocalJudge

    if local_model is None:
        from hialign.modeling import load_model

        hf_model, tokenizer, resolved = load_model(model)
        local_model = (hf_model, tokenizer, resolved.display_name)
    hf_model, tokenizer, display_name = local_model
    judge = LocalJudge(hf_model, tokenizer, display_name, cache=cache, settings=local_settings)
    if judge.warning():
        logger.warning("%s", judge.warning())
    return judge
