"""Judge throughput: HTTP requests/s against a scripted endpoint, and local-judge scoring speed.

    python bench/judge_throughput.py http  --pairs 24 --delay 0.2 --concurrency 1 8
    python bench/judge_throughput.py local --pairs 16 [--threads N] [--data PATH]

``http`` starts the scripted OpenAI-compatible server from the tests on 127.0.0.1 (it sleeps
``--delay`` seconds per request) and judges the same pairs, uncached, at each concurrency.
``local`` judges real hh-rlhf prompts with the chosen/rejected replies cut to 96 tokens (the
runner's answer length) using the embedded SmolLM2, and extrapolates to the default experiment
(4 comparisons x 40 prompts x 2 orders = 320 calls, 1,280 scorings). CPU time is reported too,
because on a shared machine wall time mostly measures the neighbours.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hialign.judge import JudgeItem, build_judge  # noqa: E402

DEFAULT_CALLS = 4 * 40 * 2


def http_bench(args) -> None:
    from tests.judge_support.scripted_server import ScriptedJudgeServer

    items = [
        JudgeItem(f"p{i}", f"Question {i}?", "An answer. GOOD", "Another answer.")
        for i in range(args.pairs)
    ]
    print(f"| concurrency | requests | seconds | requests/s |  (server sleeps {args.delay} s)")
    print("|---|---|---|---|")
    for concurrency in args.concurrency:
        with ScriptedJudgeServer(delay=args.delay) as server:
            judge = build_judge(url=server.url, model="scripted-judge", concurrency=concurrency)
            started = time.perf_counter()
            judge.judge(items, progress=False)
            elapsed = time.perf_counter() - started
            requests = server.request_count
        print(f"| {concurrency} | {requests} | {elapsed:.2f} | {requests / elapsed:.2f} |")


def local_bench(args) -> None:
    from hialign.data import load_preferences
    from hialign.modeling import load_model

    model, tokenizer, resolved = load_model(None)
    pairs = load_preferences(args.data).pairs[: args.pairs]

    def cut(text: str) -> str:
        return tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)[:96])

    items = [
        JudgeItem(f"hh{i}", list(p.prompt), cut(p.chosen), cut(p.rejected))
        for i, p in enumerate(pairs)
    ]
    from hialign.judge.local import LocalJudgeSettings

    settings = LocalJudgeSettings(threads=args.threads)
    judge = build_judge(
        local_model=(model, tokenizer, resolved.display_name), local_settings=settings
    )
    load_before = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    judge.judge(items, progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    summary = judge.summary()
    calls, tokens = summary["judge_calls"], summary["prompt_tokens"]
    threads = args.threads or __import__("torch").get_num_threads()
    print(f"local judge {judge.name}, precision {judge.precision}, {threads} threads")
    print(f"{calls} calls ({4 * calls} scorings), {tokens / calls:.0f} tokens per call")
    print(f"wall {wall:.1f} s, CPU {cpu:.1f} s, load average before {load_before:.1f}")
    print(
        f"default experiment ({DEFAULT_CALLS} calls): {wall / calls * DEFAULT_CALLS:.0f} s at "
        f"this wall rate; {cpu / threads / calls * DEFAULT_CALLS:.0f} s with {threads} "
        "thread(s) on otherwise idle cores"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    http = sub.add_parser("http", help="requests/s against the scripted server")
    http.add_argument("--pairs", type=int, default=24, help="pairs (two requests each)")
    http.add_argument("--delay", type=float, default=0.2, help="server sleep per request (s)")
    http.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    local = sub.add_parser("local", help="local SmolLM2 judge speed on hh-rlhf prompts")
    local.add_argument("--pairs", type=int, default=16)
    local.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    local.add_argument(
        "--data",
        default=str(REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base"),
        help="hh-rlhf file or folder",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    (http_bench if args.mode == "http" else local_bench)(args)


if __name__ == "__main__":
    main()
