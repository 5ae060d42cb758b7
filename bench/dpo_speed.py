"""hialign's DPO engine against TRL's DPOTrainer on the same work, side by side.

    python bench/dpo_speed.py                      # everything: fp32 and bf16, full and global
    python bench/dpo_speed.py --precisions bf16 --strategies global   # one slice
    python bench/dpo_speed.py --report             # rebuild the tables from runs so far

Every run is a fresh subprocess (so peak RSS is its own), and runs alternate: TRL, hialign, TRL
with precomputed reference log-probs, hialign, so that load from other work on the machine hits
both sides alike. Runs are appended to ``bench/results/runs.jsonl``; the report takes each
configuration's median and writes ``results.json`` and ``results.md`` next to it.
Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from workload import Workload, run  # noqa: E402

RESULTS = HERE / "results"
TRL_ENGINES = ("trl", "trl-precompute")


def matmul_gflops(seconds: float = 1.0) -> dict[str, float]:
    """Best GFLOP/s over ``seconds`` of an LM-head-sized and an MLP-sized matmul, fp32 and bf16:
    the ceiling of this machine that a run's useful work can be stated as a fraction of."""
    import torch

    shapes = {"head 1024x576x49152": (1024, 576, 49152), "mlp 1024x576x1536": (1024, 576, 1536)}
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name, (m, k, n) in shapes.items():
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
            torch.nn.functional.linear(a, b)
            best, deadline = float("inf"), time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                torch.nn.functional.linear(a, b)
                best = min(best, time.perf_counter() - start)
            out[f"{str(dtype).removeprefix('torch.')} {name}"] = 2 * m * k * n / best / 1e9
    return out


def run_in_subprocess(work: Workload) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(work))]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise RuntimeError(f"{work.engine} {work.strategy} {work.precision} failed")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - started
    return result


def plan(args) -> list[Workload]:
    """Alternating runs: for each TRL engine, that engine then hialign, per configuration."""
    runs = []
    for precision in args.precisions.split(","):
        for strategy in args.strategies.split(","):
            common = dict(strategy=strategy, precision=precision, threads=args.threads)
            common.update(pairs=args.pairs, epochs=args.epochs)
            for engine in args.engines.split(","):
                runs.append(Workload(engine=engine, **common))
                if engine in TRL_ENGINES:
                    runs.append(Workload(engine="hialign", **common))
    return runs


def summarise(rows: list[dict]) -> dict:
    """Median over runs of each (precision, strategy, engine); ratios against TRL's engines."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        w = row["workload"]
        groups.setdefault((w["precision"], w["strategy"], w["engine"]), []).append(row)

    def median(runs, key, index=None):
        values = [r[key][index] if index is not None else r[key] for r in runs]
        return statistics.median(values)

    table = {}
    for (precision, strategy, engine), runs in sorted(groups.items()):
        pairs = runs[0]["workload"]["pairs"]
        table[f"{precision}/{strategy}/{engine}"] = dict(
            precision=precision,
            strategy=strategy,
            engine=engine,
            runs=len(runs),
            reference_s=median(runs, "reference_s"),
            epoch1_s_per_pair=median(runs, "epoch_s", 0) / pairs,
            epoch2_s_per_pair=median(runs, "epoch_s", -1) / pairs,
            epoch2_cpu_s_per_pair=median(runs, "epoch_cpu_s", -1) / pairs,
            total_s_per_pair=statistics.median(
                (r["reference_s"] + sum(r["epoch_s"])) / pairs for r in runs
            ),
            peak_rss_mb=median(runs, "peak_rss_mb"),
            epoch_loss=[median(runs, "epoch_loss", i) for i in range(len(runs[0]["epoch_loss"]))],
            # Runs from before the fp32 evaluation existed have none.
            eval_loss=[
                statistics.median(r["eval_loss"][i] for r in runs if r.get("eval_loss"))
                for i in range(max(len(r.get("eval_loss", [])) for r in runs))
            ],
            load_avg=statistics.mean(x for r in runs for x in r["load_avg"]),
            threads=runs[0]["workload"]["threads"],
        )
    for row in table.values():
        ours = table.get(f"{row['precision']}/{row['strategy']}/hialign")
        if row["engine"] == "hialign" or ours is None:
            continue
        row["hialign_speedup_epoch2"] = row["epoch2_s_per_pair"] / ours["epoch2_s_per_pair"]
        row["hialign_speedup_epoch2_cpu"] = (
            row["epoch2_cpu_s_per_pair"] / ours["epoch2_cpu_s_per_pair"]
        )
        row["hialign_speedup_total"] = row["total_s_per_pair"] / ours["total_s_per_pair"]
        row["hialign_rss_fraction"] = ours["peak_rss_mb"] / row["peak_rss_mb"]
        row["max_epoch_loss_gap"] = max(
            abs(a - b) for a, b in zip(row["epoch_loss"], ours["epoch_loss"])
        )
        if row["eval_loss"] and ours["eval_loss"]:
            row["max_eval_loss_gap"] = max(
                abs(a - b) for a, b in zip(row["eval_loss"], ours["eval_loss"])
            )
    return table


def markdown(table: dict, gflops: dict) -> str:
    head = (
        "| precision | strategy | engine | runs | ref. s | epoch 1 s/pair | epoch 2 s/pair | "
        "epoch 2 CPU s/pair | peak RSS MB | loss epoch 1 / 2 | hialign speed-up epoch 2 "
        "(wall / CPU) | hialign speed-up incl. ref. | hialign RSS share | loss gap | "
        "fp32 loss after epoch 1 / 2 | its gap |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in table.values():
        losses = " / ".join(f"{x:.4f}" for x in r["epoch_loss"])
        evals = " / ".join(f"{x:.5f}" for x in r["eval_loss"]) or "–"
        extra = ["", "", "", ""]
        if "hialign_speedup_epoch2" in r:
            extra = [
                f"{r['hialign_speedup_epoch2']:.2f}x / {r['hialign_speedup_epoch2_cpu']:.2f}x",
                f"{r['hialign_speedup_total']:.2f}x",
                f"{100 * r['hialign_rss_fraction']:.0f}%",
                f"{r['max_epoch_loss_gap']:.1e}",
            ]
        gap = f"{r['max_eval_loss_gap']:.1e}" if "max_eval_loss_gap" in r else ""
        lines.append(
            f"| {r['precision']} | {r['strategy']} | {r['engine']} | {r['runs']} | "
            f"{r['reference_s']:.1f} | {r['epoch1_s_per_pair']:.3f} | "
            f"{r['epoch2_s_per_pair']:.3f} | {r['epoch2_cpu_s_per_pair']:.3f} | "
            f"{r['peak_rss_mb']:.0f} | {losses} | " + " | ".join(extra) + f" | {evals} | {gap} |"
        )
    peaks = ", ".join(f"{k}: {v:.0f}" for k, v in gflops.items())
    loads = [r["load_avg"] for r in table.values()]
    threads = sorted({r["threads"] for r in table.values()})
    return (
        head
        + "\n".join(lines)
        + f"\n\nTorch threads: {threads} (0 = default). Mean 1-minute load average over a "
        f"configuration's runs: {min(loads):.1f} to {max(loads):.1f}.\n"
        f"Matmul GFLOP/s here (best of 1 s): {peaks}.\n"
    )


def report() -> str:
    rows = [json.loads(x) for x in (RESULTS / "runs.jsonl").read_text().splitlines() if x]
    gflops_path = RESULTS / "gflops.json"
    gflops = json.loads(gflops_path.read_text()) if gflops_path.is_file() else {}
    table = summarise(rows)
    (RESULTS / "results.json").write_text(json.dumps(dict(gflops=gflops, table=table), indent=2))
    text = markdown(table, gflops)
    (RESULTS / "results.md").write_text(text)
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--strategies", default="global,full")
    parser.add_argument("--engines", default=",".join(TRL_ENGINES))
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--report", action="store_true", help="only rebuild the tables")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        names = {f.name for f in fields(Workload)}
        work = Workload(**{k: v for k, v in json.loads(args.worker).items() if k in names})
        print(json.dumps(asdict(run(work))))
        return
    RESULTS.mkdir(exist_ok=True)
    if not args.report:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        gflops = matmul_gflops()
        (RESULTS / "gflops.json").write_text(json.dumps(gflops, indent=2))
        print("matmul GFLOP/s:", {k: round(v) for k, v in gflops.items()}, flush=True)
        for work in plan(args):
            result = run_in_subprocess(work)
            with open(RESULTS / "runs.jsonl", "a") as f:
                f.write(json.dumps(result) + "\n")
            print(
                f"{work.precision} {work.strategy:>6} {work.engine:>14}: "
                f"epochs {[round(s, 1) for s in result['epoch_s']]} s, "
                f"ref {result['reference_s']:.1f} s, losses "
                f"{[round(x, 4) for x in result['epoch_loss']]}, fp32 after epochs "
                f"{[round(x, 5) for x in result['eval_loss']]}, "
                f"RSS {result['peak_rss_mb']:.0f} MB, load {result['load_avg']}",
                flush=True,
            )
    print(report())


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
