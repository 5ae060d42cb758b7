"""``hialign judge`` end to end: ordered output, summary line, and resuming after ``kill -9``."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hialign.cli import main
from tests.judge_support.scripted_server import ScriptedJudgeServer

REPO = Path(__file__).resolve().parents[1]


def write_pairs(path: Path, n: int, style: str = "plain") -> list[str]:
    ids = [f"pair-{i:03d}" for i in range(n)]
    with path.open("w") as handle:
        for i, pair_id in enumerate(ids):
            good_first = i % 2 == 0
            row = {
                "id": pair_id,
                "prompt": [{"role": "user", "content": f"Question {i}? [[style:{style}]]"}],
                "response_a": "Right. GOOD" if good_first else "Wrong.",
                "response_b": "Wrong." if good_first else "Right. GOOD",
            }
            handle.write(json.dumps(row) + "\n")
    return ids


def cached_rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT COUNT(*) FROM judge_calls").fetchone()[0]


def judge_args(pairs: Path, out: Path, server, cache: Path, concurrency: int = 2) -> list[str]:
    return [
        "judge", str(pairs), "--out", str(out), "--judge-url", server.url,
        "--judge-model", "scripted-judge", "--cache", str(cache),
        "--concurrency", str(concurrency),
    ]  # fmt: skip


def test_cli_writes_every_row_in_input_order_and_a_summary_line(tmp_path, capsys):
    pairs, out, cache = tmp_path / "pairs.jsonl", tmp_path / "verdicts.jsonl", tmp_path / "c.db"
    ids = write_pairs(pairs, 5)
    with ScriptedJudgeServer() as server:
        assert main(judge_args(pairs, out, server, cache)) == 0
        first_line = capsys.readouterr().out.strip().splitlines()[-1]
        assert main(judge_args(pairs, out, server, cache)) == 0
        second_line = capsys.readouterr().out.strip().splitlines()[-1]

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in rows] == ids
    assert set(rows[0]) == {"id", "verdicts", "orders", "judge"}
    assert [o["order"] for o in rows[0]["orders"]] == ["ab", "ba"]
    assert rows[0]["verdicts"]["factuality"] == "a" and rows[1]["verdicts"]["factuality"] == "b"
    assert first_line.startswith("judged 5 pairs (10 calls): 10 HTTP requests, 0 cache hits")
    assert "invalid 0 (grammar_fluency 0" in first_line
    assert "order disagreement 0.0%, first-shown wins 50.0%" in first_line
    assert "tokens 1,000 prompt + 100 completion" in first_line
    assert second_line.startswith("judged 5 pairs (10 calls): 0 HTTP requests, 10 cache hits")


def test_cli_stops_on_a_refused_request_with_one_clear_error(tmp_path, caplog):
    pairs, out, cache = tmp_path / "pairs.jsonl", tmp_path / "verdicts.jsonl", tmp_path / "c.db"
    write_pairs(pairs, 2, style="badrequest")
    with ScriptedJudgeServer() as server:
        assert main(judge_args(pairs, out, server, cache)) == 2
    assert "HTTP 400: The model `nonexistent-judge` does not exist" in caplog.text
    assert not out.exists()


def test_killed_run_resumes_and_asks_only_what_is_missing(tmp_path):
    pairs, out, cache = tmp_path / "pairs.jsonl", tmp_path / "verdicts.jsonl", tmp_path / "c.db"
    ids = write_pairs(pairs, 20)
    total_calls = 40
    with ScriptedJudgeServer(delay=0.2) as server:
        command = [sys.executable, "-m", "hialign.cli", *judge_args(pairs, out, server, cache)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        child = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 120
        while server.request_count < 12:
            assert child.poll() is None, "the judge run ended before it could be killed"
            assert time.monotonic() < deadline, "the judge run never got going"
            time.sleep(0.02)
        child.kill()  # SIGKILL: no clean-up, no flush, like kill -9
        child.wait()
        asked_before_kill = server.request_count

        stored = cached_rows(cache)
        assert not out.exists()  # the output is only ever written whole
        assert 0 < stored < total_calls
        assert stored >= asked_before_kill - 4  # at most the calls in flight were lost

        assert main(judge_args(pairs, out, server, cache, concurrency=4)) == 0
        asked_on_resume = server.request_count - asked_before_kill

    assert asked_on_resume == total_calls - stored
    assert cached_rows(cache) == total_calls
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in rows] == ids
    assert all("invalid" not in row["verdicts"].values() for row in rows)


@pytest.mark.parametrize("bad", ['{"id": 1}', "not json"])
def test_cli_rejects_a_broken_pairs_file_naming_the_line(tmp_path, caplog, bad):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(bad + "\n")
    code = main(["judge", str(pairs), "--out", str(tmp_path / "o.jsonl"), "--judge-url",
                 "http://127.0.0.1:9/v1", "--judge-model", "m"])  # fmt: skip
    assert code == 2
    assert "pairs.jsonl:1:" in caplog.text


def test_cli_exits_non_zero_when_every_verdict_is_invalid(tmp_path, caplog):
    pairs, out, cache = tmp_path / "pairs.jsonl", tmp_path / "v.jsonl", tmp_path / "c.sqlite"
    write_pairs(pairs, 2, style="malformed")
    with ScriptedJudgeServer() as server:
        assert main(judge_args(pairs, out, server, cache) + ["--parse-retries", "0"]) == 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]  # still written
    assert all(set(row["verdicts"].values()) == {"invalid"} for row in rows)
    assert "every verdict is invalid" in caplog.text
