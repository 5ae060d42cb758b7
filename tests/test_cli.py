"""The command line: block map and clear errors."""

from hialign.cli import main


def test_blocks_prints_the_thirds_map_of_smollm2(capsys, smollm2_path):
    assert main(["blocks"]) == 0
    out = capsys.readouterr().out
    assert "30 decoder layers" in out
    assert "local: layers     0-9 (10 layers)" in out
    assert "global: layers   20-29 (10 layers)" in out
    assert "self_attn.q_proj" in out


def test_blocks_with_four_blocks(capsys, smollm2_path):
    assert main(["blocks", "--num-blocks", "4"]) == 0
    out = capsys.readouterr().out
    assert "block0: layers     0-7 (8 layers)" in out
    assert "block3: layers   23-29 (7 layers)" in out


def test_blocks_previews_explicit_spans_and_refuses_bad_ones(capsys, caplog, smollm2_path):
    assert main(["blocks", "--blocks", "0-19,20-24,25-29"]) == 0
    out = capsys.readouterr().out
    assert "local: layers    0-19 (20 layers)" in out
    assert "global: layers   25-29 (5 layers)" in out
    assert main(["blocks", "--blocks", "0-9,12-29"]) == 2
    assert "do not cover layers 0-29 exactly once" in caplog.text


def test_missing_gguf_is_a_one_line_error(caplog):
    assert main(["blocks", "--model", "/nowhere/model.gguf"]) == 2
    assert "GGUF file not found: /nowhere/model.gguf" in caplog.text


def test_failed_run_keeps_the_earlier_config_and_says_why_in_run_log(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("data: earlier.jsonl\n")
    missing = tmp_path / "nowhere.jsonl"
    assert main(["run", "--data", str(missing), "--out", str(out)]) == 2
    assert (out / "config.yaml").read_text() == "data: earlier.jsonl\n"
    log = (out / "run.log").read_text()
    assert "run stopped: " in log and "nowhere.jsonl" in log


def test_hub_id_offline_fails_at_once_with_a_hint(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "hialign.cli", "blocks", "--model", "someone/no-such-model"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "ModelLoadError: could not load model 'someone/no-such-model'" in done.stderr
    assert "no local path, so it was fetched from the Hugging Face hub" in done.stderr


def test_http_log_lines_lose_url_credentials():
    import logging

    from hialign.cli import redact_urls

    record = logging.LogRecord(
        "httpx", logging.INFO, __file__, 1, 'HTTP Request: %s %s "%s"',
        ("POST", "http://bob:hunter2@127.0.0.1:8000/v1/chat?api_key=sk-123&x=1", "HTTP/1.1 200"),
        None,
    )  # fmt: skip
    assert redact_urls(record) is True
    line = record.getMessage()
    assert "hunter2" not in line and "sk-123" not in line
    assert "http://***@127.0.0.1:8000/v1/chat?api_key=***&x=1" in line


def test_ctrl_c_is_one_line_and_exit_code_130(monkeypatch, caplog):
    import hialign.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(hialign.cli, "_blocks", interrupted)
    assert main(["blocks"]) == 130
    assert "interrupted; finished stages are kept" in caplog.text
