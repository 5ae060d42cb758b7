"""The ``hialign`` command: wires the stages together; no method logic lives here."""

from __future__ import annotations

import argparse
import logging
import re
import sys

logger = logging.getLogger("hialign")


def _add_blocks(sub) -> None:
    p = sub.add_parser("blocks", help="print a model's layer-block map and attention targets")
    p.add_argument("--model", default=None, help="embedded (default), .gguf, folder or hub id")
    p.add_argument("--num-blocks", type=int, default=3, help="number of contiguous blocks")
    p.add_argument("--blocks", default=None, help="explicit spans to check, e.g. 0-19,20-24,25-29")
    p.set_defaults(func=_blocks)


def _blocks(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from hialign.modeling import load_config
    from hialign.partition import (
        attention_modules,
        blocks_from_spans,
        format_block_map,
        partition_layers,
    )

    config, resolved = load_config(args.model)
    # Build the architecture on the meta device: no weights are read to print the map.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    projections, path = attention_modules(model)
    _, layers = _decoder(model)
    if args.blocks == "auto":
        raise ValueError("--blocks auto comes from the gradient probe: run `hialign probe`")
    if args.blocks:
        blocks = blocks_from_spans(args.blocks, len(layers))
    else:
        if args.num_blocks < 1:
            raise ValueError(f"--num-blocks must be >= 1, got {args.num_blocks}")
        blocks = partition_layers(len(layers), args.num_blocks)
    print(f"{resolved.display_name}: {len(layers)} decoder layers at {path}")
    print(f"attention projections per layer: {', '.join(projections)}")
    print(format_block_map(blocks))
    return 0


def _decoder(model):
    from hialign.partition import find_decoder_layers

    return find_decoder_layers(model)


def _add_stats(sub) -> None:
    p = sub.add_parser("stats", help="statistics (NWR, Wilson, delta-method, binomial) on counts")
    p.add_argument("counts", help="CSV with columns comparison,dimension,model,wins,losses,ties")
    p.add_argument("--format", choices=["json", "table", "csv"], default="table")
    p.add_argument("--out", default=None, help="write to this file instead of stdout")
    p.set_defaults(func=_stats)


def _stats(args) -> int:
    from hialign.stats import stats_command

    return stats_command(args.counts, fmt=args.format, out=args.out)


def _add_judge(sub) -> None:
    p = sub.add_parser("judge", help="pairwise LLM judging of PAIRS.jsonl on four dimensions")
    p.add_argument("pairs", help="JSONL rows {id, prompt, response_a, response_b}")
    p.add_argument("--out", required=True, help="output JSONL of verdicts")
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible base URL (e.g. .../v1)")
    p.add_argument("--judge-model", default=None, help="model name at the endpoint, or local HF")
    p.add_argument(
        "--api-key-env",
        "--judge-api-key-env",
        default="HIALIGN_JUDGE_API_KEY",
        help="env var with the key",
    )
    p.add_argument(
        "--concurrency", "--judge-concurrency", type=int, default=4, help="requests in flight"
    )
    p.add_argument(
        "--cache", default=None, help="SQLite cache of judge calls (default: OUT + .cache.sqlite)"
    )
    p.add_argument(
        "--max-retries", "--judge-max-retries", type=int, default=5, help="HTTP retries per call"
    )
    p.add_argument(
        "--parse-retries",
        "--judge-parse-retries",
        type=int,
        default=2,
        help="re-asks on unparseable output",
    )
    p.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per HTTP request")
    p.add_argument("--judge-max-tokens", type=int, default=4096, help="completion cap per call")
    p.add_argument(
        "--judge-prices",
        default=None,
        help="PROMPT,COMPLETION cost per million tokens, e.g. 0.55,2.19 (adds cost to the summary)",
    )
    p.set_defaults(func=_judge)


def _judge(args) -> int:
    from hialign.judge.command import judge_command

    return judge_command(args)


PROBE_DEFAULT_PAIRS = 160  # sized to run in ~5 minutes on 2 CPU cores


def add_probe_arguments(parser) -> None:
    """The flags of ``hialign probe``."""
    add = parser.add_argument
    add("--model", default=None, help="embedded SmolLM2 (default), a .gguf file, folder or hub id")
    add("--data", required=True, help="preference data: .jsonl[.gz] file, folder, or hub id")
    add("--data-split", default="test", help="split to read when --data is a hub id")
    add("--strict", action="store_true", help="stop at the first malformed row")
    add(
        "--pairs",
        type=int,
        default=PROBE_DEFAULT_PAIRS,
        help=f"pairs probed (default {PROBE_DEFAULT_PAIRS})",
    )
    add("--out", default="runs/probe", help="output folder (default runs/probe)")
    add("--max-length", type=int, default=256, help="max tokens of prompt + response")
    add("--batch-size", type=int, default=4, help="pairs per forward/backward")
    add("--beta", type=float, default=0.1, help="DPO beta (scales all norms, not their ratios)")
    add("--precision", choices=("bf16", "fp32"), default="bf16", help="bf16 autocast or fp32")
    add("--num-blocks", type=int, default=3, help="K, number of contiguous blocks")
    add("--blocks", default=None, help="blocks to test: equal (default), 0-9,10-19,20-29 or auto")
    add("--min-block-size", type=int, default=None, help="smallest auto block (default L/2K)")
    add("--tag-column", default=None, help="raw JSONL column whose values split pairs by objective")
    add("--subset", action="append", help="NAME=REGEX: pairs whose prompt matches (repeatable)")
    add("--bootstrap", type=int, default=2000, help="bootstrap resamples of the pairs")
    add("--seed", type=int, default=42, help="seed of pair sampling and bootstrap")
    add("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")


def _add_probe(sub) -> None:
    p = sub.add_parser(
        "probe",
        help="Hypothesis-2 probe: per-layer DPO gradient norms, verdict, data-driven blocks",
    )
    add_probe_arguments(p)
    p.set_defaults(func=_probe)


def _probe(args) -> int:
    from hialign.probe_report import probe_command

    return probe_command(args)


def _add_run(sub) -> None:
    from hialign.config import add_run_arguments

    p = sub.add_parser("run", help="the whole experiment: train, merge, generate, judge, report")
    add_run_arguments(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from hialign.config import config_from_args
    from hialign.experiment import run_experiment

    run_experiment(config_from_args(args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hialign", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_run, _add_blocks, _add_stats, _add_judge, _add_probe):
        add(sub)
    return parser


_URL_SECRETS = (
    (re.compile(r"(//)[^/@\s]+@"), r"\1***@"),  # user:password@host
    (
        re.compile(r"([?&][^=&\s]*(?:key|token|secret|password|auth)[^=&\s]*=)[^&\s\"']+", re.I),
        r"\1***",
    ),
)


def redact_urls(record: logging.LogRecord) -> bool:
    """Logging filter: credentials in URLs (``user:pass@``, ``?api_key=``) never reach a log,
    even in the HTTP client libraries' own debug lines."""
    text = record.getMessage()
    clean = text
    for pattern, replacement in _URL_SECRETS:
        clean = pattern.sub(replacement, clean)
    if clean != text:
        record.msg, record.args = clean, None
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "httpx2", "httpcore", "openai"):  # one line per HTTP request otherwise
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
        logging.getLogger(noisy).addFilter(redact_urls)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError) as err:
        # Known, user-facing failures: one clear line, no traceback. Others keep theirs.
        logger.error("%s: %s", type(err).__name__, err)
        if args.verbose:
            raise
        return 2
    except KeyboardInterrupt:
        if args.verbose:
            raise
        logger.error("interrupted; finished stages are kept: run the same command to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
