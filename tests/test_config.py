"""Run configuration: every bad value is refused before any model or data is loaded."""

import pytest

from hialign.cli import build_parser
from hialign.config import RunConfig, config_from_args


def config(*flags):
    return config_from_args(build_parser().parse_args(["run", "--data", "d", "--out", "o", *flags]))


def test_defaults_are_the_documented_plan():
    c = config()
    assert (c.train_pairs, c.eval_prompts, c.max_length, c.batch_size) == (128, 40, 256, 4)
    assert c.strategy_list() == ["full", "local", "mid", "global"]


def test_smoke_preset_is_overridden_by_explicit_flags():
    c = config("--smoke", "--eval-prompts", "5")
    assert (c.train_pairs, c.eval_prompts, c.max_steps) == (8, 5, 2)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--strategies", "full,top"], "unknown block 'top'"),
        (["--num-blocks", "4"], "unknown block 'local'.*block0, block1, block2, block3"),
        (["--strategies", "full+local"], "'full' cannot be part of a union"),
        (["--strategies", ","], "--strategies is empty"),
        (["--strategies", "mid,mid"], "twice"),
        (["--max-steps", "-1"], "--max-steps must be >= 0"),
        (["--lora-dropout", "1.5"], r"--lora-dropout must be in \[0, 1\)"),
        (["--learning-rate", "-1"], "--learning-rate must be > 0"),
        (["--top-p", "2"], r"--top-p must be in \(0, 1\]"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--judge-concurrency", "0"], "--judge-concurrency must be >= 1"),
        (["--judge-max-retries", "-1"], "--judge-max-retries must be >= 0"),
        (["--strategies", "local+local"], "names block 'local' twice"),
    ],
)
def test_bad_values_are_refused_with_the_flag_named(flags, message):
    with pytest.raises(ValueError, match=message):
        config(*flags)


def test_unions_and_explicit_blocks_are_accepted():
    assert config("--strategies", "local+global").strategy_list() == ["local+global"]
    c = config("--num-blocks", "4", "--strategies", "full,block0+block3")
    assert c.block_names() == ["block0", "block1", "block2", "block3"]
    assert config("--blocks", "0-4,5-19,20-29", "--strategies", "mid").block_names()[1] == "mid"


def test_yaml_values_of_the_wrong_type_are_refused(tmp_path):
    for text, message in [
        ("train_pairs: eight\n", "--train-pairs must be int, got 'eight'"),
        ('beta: "small"\n', "--beta must be float, got 'small'"),
        ("beta: .nan\n", "--beta must be a finite number"),
        ("precision: fp16\n", "--precision must be one of \\['bf16', 'fp32'\\], got 'fp16'"),
        ("data: [unclosed\n", "run.yaml: not valid YAML"),
        ("strategies: [local, global]\n", "--strategies must be str"),
        ("strict: 1\n", "--strict must be bool"),
        ("trian_pairs: 8\n", "unknown keys \\['trian_pairs'\\]"),
    ]:
        path = tmp_path / "run.yaml"
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            config("--config", str(path))


def test_yaml_accepts_dashed_keys_and_the_smoke_preset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("smoke: true\ntrain-pairs: 6\nbeta: 0.2\n")
    c = config("--config", str(path), "--beta", "0.3")
    assert (c.train_pairs, c.max_steps, c.beta) == (6, 2, 0.3)


def test_integers_are_accepted_where_floats_are_expected():
    c = RunConfig(data="d", out="o", beta=1, learning_rate=1)
    c.validate()
    assert c.beta == 1


def test_yaml_reads_exponent_floats_that_yaml_leaves_as_strings(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 5e-4\nbeta: '0.2'\n")  # YAML 1.1: both are strings
    c = config("--config", str(path))
    assert (c.learning_rate, c.beta) == (0.0005, 0.2)
