"""Stage 0: preference data (hh-rlhf and prompt/chosen/rejected rows), splits, tokenisation."""

import gzip
import json
import logging

import pytest

from hialign.data import (
    DataSourceError,
    MalformedRowError,
    PreferencePair,
    SkippedRow,
    load_preferences,
    render_prompt,
    split_train_eval,
)
from hialign.tokenization import (
    ChatTemplateError,
    TokenizedPair,
    collate_pairs,
    fit_prompt,
    tokenize_pair,
    tokenize_pairs,
)

END_OF_TURN = "<|im_end|>"
GENERATION_MARKER = "<|im_start|>assistant\n"


def transcript(*turns):
    """hh-rlhf transcript from alternating turns, starting with the human."""
    return "".join(f"\n\n{('Human', 'Assistant')[i % 2]}: {t}" for i, t in enumerate(turns))


def write_jsonl(path, rows):
    """Write rows (dicts, or raw strings written as they are) one a line."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


GOOD_ROW = {"chosen": transcript("Hi?", "Hello!"), "rejected": transcript("Hi?", "Go away.")}


@pytest.fixture(scope="module")
def hh(hh_path):
    return load_preferences(str(hh_path))


@pytest.fixture(scope="module")
def hh_by_line(hh):
    return {int(pair.source.split(":")[1]): pair for pair in hh.pairs}


# --- the real hh-rlhf harmless-base test file --------------------------------------------------


def test_real_file_reads_2312_rows_into_2271_pairs(hh):
    assert hh.rows_read == 2312
    assert len(hh.pairs) == 2271
    assert len(hh.pairs) + len(hh.skipped) == hh.rows_read


def test_real_file_skip_counts_by_reason(hh):
    assert hh.skip_counts() == {
        "human turn inside reply": 31,
        "diverging prompts": 5,
        "empty reply": 4,
        "assistant turn inside reply": 1,
    }


def test_real_file_skips_name_their_lines(hh):
    reasons = {row.source: row.reason for row in hh.skipped}
    assert reasons["test.jsonl.gz:87"] == "empty reply"
    assert reasons["test.jsonl.gz:30"] == "human turn inside reply"  # reply opens "Human: ..."
    assert reasons["test.jsonl.gz:1173"] == "human turn inside reply"  # glued after a sentence
    assert reasons["test.jsonl.gz:1561"] == "assistant turn inside reply"  # "\nAssistant:"
    diverging = sorted(int(s.split(":")[1]) for s, r in reasons.items() if r == "diverging prompts")
    assert diverging == [1255, 1689, 1951, 1953, 2037]


def test_multi_turn_row_becomes_the_right_messages(hh_by_line):
    pair = hh_by_line[1]
    assert [m["role"] for m in pair.prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert pair.prompt[0] == user("what are some pranks with a pen i can do?")
    assert pair.prompt[1] == assistant("Are you looking for practical joke ideas?")
    assert pair.prompt[2] == user("yep")
    assert pair.prompt[3]["content"].startswith("Ok, I’ll give you a couple examples")
    assert "\n\n1. Draw a penis" in pair.prompt[3]["content"]  # blank lines inside a turn stay
    assert pair.prompt[4] == user("okay some of these do not have anything to do with pens")
    assert pair.chosen == (
        "No, sorry!  All of these involve a pen, the point is that you can get funny "
        "results by doing pranks with pens."
    )
    assert pair.rejected.startswith("There are lots of funny things you can do with pens")
    assert pair.source == "test.jsonl.gz:1"


def test_two_assistant_turns_in_a_row_are_merged_in_the_prompt(hh_by_line):
    pair = hh_by_line[764]
    assert [m["role"] for m in pair.prompt] == ["user", "assistant", "user"]
    assert pair.prompt[1]["content"].startswith("Not especially!")
    assert "\n\nWow, that sounds very intense." in pair.prompt[1]["content"]


def test_markers_in_earlier_turns_are_kept_verbatim(hh_by_line):
    pair = hh_by_line[147]
    assert pair.prompt[1] == assistant(
        "Human: Do you think that that’s because there’s less competition?"
    )
    assert pair.chosen == "Seems that way!"


# --- malformed rows, synthetic ---------------------------------------------------------------


def hh_row(chosen, rejected="No.", question="Hi?", other_question="Hi?"):
    return {
        "chosen": transcript(question, chosen),
        "rejected": transcript(other_question, rejected),
    }


MALFORMED = [  # (reason, row written at line 2, after a good row)
    ("bad json", '{"chosen": "\\n\\nHuman: hi'),
    ("invalid unicode", '{"prompt": "lone \\ud800 surrogate", "chosen": "a", "rejected": "b"}'),
    ("not an object", "[1, 2]"),
    ("missing key 'chosen'", {"rejected": transcript("Hi?", "No.")}),
    ("missing key 'rejected'", {"chosen": transcript("Hi?", "Yes.")}),
    ("wrong type for 'chosen'", {"chosen": 7, "rejected": transcript("Hi?", "No.")}),
    ("not a transcript", {"chosen": "Human: Hi?\n\nAssistant: Yes.", "rejected": "No."}),
    ("no assistant turn", {"chosen": transcript("Hi?", "Yes.", "Ok?"), "rejected": "\n\nHuman: x"}),
    ("no user turn", {"chosen": "\n\nAssistant: Yes.", "rejected": "\n\nAssistant: No."}),
    ("empty reply", hh_row("  ")),
    ("diverging prompts", hh_row("Yes.", other_question="Yo?")),
    ("human turn inside reply", hh_row("Sure, go on.  Human: And then what?")),
    ("human turn inside reply", hh_row("Human: Why?")),
    ("assistant turn inside reply", hh_row("Fine.\nAssistant: By the way, bye.")),
    ("identical replies", hh_row("Same.", "Same.")),
    ("wrong type for 'prompt'", {"prompt": 3, "chosen": "Yes.", "rejected": "No."}),
    (
        "bad message",
        {"prompt": [{"role": "bot", "content": "Hi?"}], "chosen": "a", "rejected": "b"},
    ),
    ("no user turn", {"prompt": [user("Hi?"), assistant("Hi.")], "chosen": "a", "rejected": "b"}),
    ("no assistant turn", {"prompt": "Hi?", "chosen": [user("4")], "rejected": "5"}),
    ("empty reply", {"prompt": "Hi?", "chosen": "", "rejected": "5"}),
    ("empty prompt", {"prompt": "  ", "chosen": "Yes.", "rejected": "No."}),
    ("empty prompt", {"prompt": [user("")], "chosen": "Yes.", "rejected": "No."}),
    ("empty prompt", hh_row("Yes.", question="", other_question="")),
]


@pytest.mark.parametrize(
    "reason,row", MALFORMED, ids=[f"{i}-{r}" for i, (r, _) in enumerate(MALFORMED)]
)
def test_each_malformed_kind_is_skipped_with_its_reason_and_line(tmp_path, reason, row):
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD_ROW, row])
    data = load_preferences(str(path))
    assert data.rows_read == 2
    assert [p.source for p in data.pairs] == ["rows.jsonl:1"]
    assert data.skipped == [SkippedRow("rows.jsonl:2", reason)]
    assert data.skip_counts() == {reason: 1}


def test_strict_mode_raises_naming_file_line_and_reason(tmp_path):
    bad = {"chosen": transcript("Hi?", ""), "rejected": transcript("Hi?", "No.")}
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD_ROW, GOOD_ROW, bad])
    with pytest.raises(MalformedRowError) as raised:
        load_preferences(str(path), strict=True)
    assert (raised.value.path, raised.value.line) == (str(path), 3)
    assert raised.value.reason == "empty reply"
    assert str(raised.value) == f"{path}:3: empty reply"


def test_strict_mode_stops_at_the_first_bad_row_of_the_real_file(hh_path):
    with pytest.raises(MalformedRowError, match="test.jsonl.gz:30: human turn inside reply"):
        load_preferences(str(hh_path), strict=True)


def test_default_mode_logs_each_skip_with_file_and_line(tmp_path, caplog):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD_ROW, "not json", GOOD_ROW])
    with caplog.at_level(logging.INFO, logger="hialign.data"):
        data = load_preferences(str(path))
    assert f"{path}:2: skipped, bad json" in caplog.text
    assert "read 3 rows" in caplog.text and "2 pairs, 1 skipped (bad json 1)" in caplog.text
    assert len(data.pairs) == 2


def test_blank_lines_are_not_rows(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text(f"\n{json.dumps(GOOD_ROW)}\n   \n{json.dumps(GOOD_ROW)}\n", encoding="utf-8")
    data = load_preferences(str(path))
    assert data.rows_read == 2
    assert [p.source for p in data.pairs] == ["gaps.jsonl:2", "gaps.jsonl:4"]


# --- the prompt/chosen/rejected format and other sources ------------------------------------


def test_prompt_format_with_strings(tmp_path):
    row = {"prompt": "Name a colour.", "chosen": " Blue. ", "rejected": "No."}
    data = load_preferences(str(write_jsonl(tmp_path / "p.jsonl", [row])))
    assert data.pairs == [PreferencePair((user("Name a colour."),), "Blue.", "No.", "p.jsonl:1")]


def test_prompt_format_with_message_lists(tmp_path):
    prompt = [
        {"role": "system", "content": "Be brief."},
        user("Hi?"),
        assistant("Hi."),
        user("2+2?"),
    ]
    row = {
        "prompt": prompt,
        "chosen": [*prompt, assistant("4")],  # full conversation: the final message is the reply
        "rejected": [assistant("5")],
    }
    data = load_preferences(str(write_jsonl(tmp_path / "m.jsonl", [row])))
    assert data.pairs == [PreferencePair(tuple(prompt), "4", "5", "m.jsonl:1")]


def test_directory_reads_every_jsonl_file_sorted_by_name(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [GOOD_ROW, "oops"])
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"prompt": "Q?", "chosen": "yes", "rejected": "no"}) + "\n")
    (tmp_path / "notes.txt").write_text("not data")
    data = load_preferences(str(tmp_path))
    assert data.rows_read == 3
    assert [p.source for p in data.pairs] == ["a.jsonl.gz:1", "b.jsonl:1"]
    assert data.skipped == [SkippedRow("b.jsonl:2", "bad json")]


@pytest.mark.parametrize("content", [b"\x1f\x8b\x08\x00cut", b"not gzip at all"])
def test_truncated_or_mislabelled_gzip_names_the_file(tmp_path, content):
    good = gzip.compress(json.dumps(GOOD_ROW).encode() + b"\n")
    path = tmp_path / "rows.jsonl.gz"
    path.write_bytes(content if content.startswith(b"not") else good[: len(good) // 2])
    with pytest.raises(DataSourceError, match="rows.jsonl.gz: unreadable gzip"):
        load_preferences(str(path))


def test_folder_without_jsonl_files_is_an_error(tmp_path):
    with pytest.raises(DataSourceError, match="no \\*.jsonl"):
        load_preferences(str(tmp_path))


def test_missing_local_path_is_an_error(tmp_path):
    with pytest.raises(DataSourceError, match="no such file"):
        load_preferences(str(tmp_path / "missing.jsonl"))


def test_hub_id_without_network_gives_a_clear_error(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # The flags are read at import time, so set the module copies as well as the variable.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataSourceError, match="network") as raised:
        load_preferences("hialign-tests/no-such-dataset")
    assert "hialign-tests/no-such-dataset" in str(raised.value)


def test_render_prompt_writes_plain_dialogue():
    pair = PreferencePair((user("Hi?"), assistant("Hello."), user("Bye?")), "Bye.", "No.", "x:1")
    assert render_prompt(pair) == "Human: Hi?\n\nAssistant: Hello.\n\nHuman: Bye?"
    assert render_prompt([{"role": "system", "content": "S"}, user("Q")]) == "System: S\n\nHuman: Q"


# --- train / eval split ------------------------------------------------------------------------


def make_pairs(n_prompts, copies=1):
    return [
        PreferencePair((user(f"question {i}"),), f"good {i}.{c}", f"bad {i}.{c}", f"s:{i}.{c}")
        for i in range(n_prompts)
        for c in range(copies if i % 2 else 1)  # odd prompts are duplicated
    ]


def test_eval_prompts_never_appear_in_training_even_when_duplicated():
    pairs = make_pairs(40, copies=3)  # 20 unique + 20 prompts thrice = 80 pairs
    train, held_out = split_train_eval(pairs, n_train=40, n_eval=15, seed=0)
    eval_prompts = [render_prompt(p) for p in held_out]
    assert (len(train), len(held_out)) == (40, 15)
    assert len(set(eval_prompts)) == 15
    assert not set(eval_prompts) & {render_prompt(p) for p in train}


def test_real_split_is_disjoint_by_prompt(hh):
    train, held_out = split_train_eval(hh.pairs, n_train=1500, n_eval=500, seed=3)
    assert not {render_prompt(p) for p in held_out} & {render_prompt(p) for p in train}


def test_split_is_deterministic_for_a_seed():
    pairs = make_pairs(50, copies=2)
    first = split_train_eval(pairs, 30, 10, seed=7)
    assert first == split_train_eval(pairs, 30, 10, seed=7)
    assert first != split_train_eval(pairs, 30, 10, seed=8)


def test_split_says_how_many_are_available():
    pairs = make_pairs(10, copies=3)  # 10 distinct prompts, 20 pairs
    with pytest.raises(ValueError, match="only 10 distinct prompts \\(20 pairs\\)"):
        split_train_eval(pairs, n_train=1, n_eval=11, seed=0)
    with pytest.raises(ValueError, match="asked for 50 training pairs but only"):
        split_train_eval(pairs, n_train=50, n_eval=2, seed=0)


# --- tokenisation ----------------------------------------------------------------------------


def ids_of(tokenizer, text):
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_tokenization_names_are_importable_from_data():
    from hialign import data

    assert data.tokenize_pairs is tokenize_pairs and data.TokenizedPair is TokenizedPair


def test_prompt_ends_with_generation_marker_and_responses_with_end_of_turn(tokenizer):
    pair = PreferencePair((user("Hi?"),), "Hello there!", "Go away.", "x:1")
    tokenized = tokenize_pair(tokenizer, pair, max_length=512)
    marker = ids_of(tokenizer, GENERATION_MARKER)
    assert tokenized.prompt_ids[-len(marker) :] == marker
    assert tokenizer.decode(tokenized.chosen_ids) == "Hello there!" + END_OF_TURN
    assert tokenizer.decode(tokenized.rejected_ids) == "Go away." + END_OF_TURN


def test_loss_mask_marks_exactly_the_response_tokens(tokenizer):
    short = PreferencePair((user("Hi?"),), "Yo.", "A much longer rejected reply, really.", "a:1")
    long = PreferencePair(
        (user("Tell me a long story, please."),), "Once upon a time.", "No.", "b:1"
    )
    batch = [tokenize_pair(tokenizer, p, max_length=512) for p in (short, long)]
    tensors = collate_pairs(batch, pad_token_id=tokenizer.pad_token_id)
    input_ids, attention, loss_mask = (
        tensors[k] for k in ("input_ids", "attention_mask", "loss_mask")
    )
    assert input_ids.shape == attention.shape == loss_mask.shape
    assert input_ids.shape[0] == 4

    rows = [(b, b.chosen_ids) for b in batch] + [(b, b.rejected_ids) for b in batch]
    replies = [short.chosen, long.chosen, short.rejected, long.rejected]
    for row, ((tok, response), reply) in enumerate(zip(rows, replies)):
        start, end = len(tok.prompt_ids), len(tok.prompt_ids) + len(response)
        assert loss_mask[row].nonzero().flatten().tolist() == list(range(start, end))
        assert input_ids[row, :start].tolist() == list(tok.prompt_ids)
        assert tokenizer.decode(input_ids[row][loss_mask[row]]) == reply + END_OF_TURN
        assert attention[row].tolist() == [1] * end + [0] * (input_ids.shape[1] - end)
        assert (input_ids[row, end:] == tokenizer.pad_token_id).all()


def test_real_replies_decode_back_from_masked_tokens(tokenizer, hh):
    kept, skipped = tokenize_pairs(tokenizer, hh.pairs[:40], max_length=2048)
    assert (len(kept), skipped) == (40, [])
    tensors = collate_pairs(kept[:8], pad_token_id=tokenizer.pad_token_id)
    for row, pair in enumerate(hh.pairs[:8]):
        masked = tensors["input_ids"][row][tensors["loss_mask"][row]]
        assert tokenizer.decode(masked) == pair.chosen + END_OF_TURN


def test_truncation_drops_earliest_turns_and_keeps_the_last_turn_marker(tokenizer):
    filler = "word " * 60
    prompt = (user("First " + filler), assistant("Reply " + filler), user("Last question?"))
    pair = PreferencePair(prompt, "Short answer.", "Other answer.", "t:1")
    full = tokenize_pair(tokenizer, pair, max_length=4096)
    fitted = tokenize_pair(tokenizer, pair, max_length=len(full.prompt_ids) - 50)

    text = tokenizer.decode(fitted.prompt_ids)
    assert text.endswith(
        "<|im_start|>user\nLast question?" + END_OF_TURN + "\n" + GENERATION_MARKER
    )
    assert "First" not in text and "Reply" not in text
    assert text.startswith("<|im_start|>system\n")  # the template's default system turn stays
    assert fitted.chosen_ids == full.chosen_ids  # responses untouched when dropping suffices


def test_truncation_cuts_responses_when_the_final_turn_alone_is_too_long(tokenizer):
    pair = PreferencePair((user("Go on."),), "story " * 100, "No.", "t:1")
    full = tokenize_pair(tokenizer, pair, max_length=4096)
    max_length = len(full.prompt_ids) + 20
    fitted = tokenize_pair(tokenizer, pair, max_length=max_length)
    assert fitted.prompt_ids == full.prompt_ids
    assert fitted.chosen_ids == full.chosen_ids[:20]
    assert fitted.rejected_ids == full.rejected_ids  # already short enough


def test_pairs_that_cannot_fit_are_skipped_as_too_long(tokenizer):
    pair = PreferencePair((user("Hi?"),), "Hello there. " * 20, "No.", "ok:1")
    prompt_length = len(tokenize_pair(tokenizer, pair, max_length=512).prompt_ids)
    assert tokenize_pair(tokenizer, pair, prompt_length + 7, min_response_tokens=8) == "too long"
    assert len(tokenize_pair(tokenizer, pair, prompt_length + 8).chosen_ids) == 8

    huge = PreferencePair((user("Hi?"), assistant("Hi."), user("x " * 300)), "Yes.", "No.", "big:7")
    kept, skipped = tokenize_pairs(tokenizer, [pair, huge], max_length=128)
    assert [p.source for p in kept] == ["ok:1"]
    assert skipped == [SkippedRow("big:7", "too long")]


def test_replies_identical_after_cutting_are_skipped(tokenizer):
    pair = PreferencePair((user("Go on."),), "same " * 50 + "A", "same " * 50 + "B", "t:1")
    prompt_length = len(tokenize_pair(tokenizer, pair, max_length=4096).prompt_ids)
    assert tokenize_pair(tokenizer, pair, prompt_length + 10) == "identical after truncation"


def test_real_pairs_fit_max_length(tokenizer, hh):
    kept, skipped = tokenize_pairs(tokenizer, hh.pairs[:200], max_length=256)
    marker = ids_of(tokenizer, GENERATION_MARKER)
    assert len(kept) + len(skipped) == 200
    for tokenized in kept:
        longest = max(len(tokenized.chosen_ids), len(tokenized.rejected_ids))
        assert len(tokenized.prompt_ids) + longest <= 256
        assert tokenized.prompt_ids[-len(marker) :] == marker


def test_template_that_breaks_the_prefix_raises(tokenizer, monkeypatch):
    # A template whose generation prompt differs from how it opens a rendered assistant turn.
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\nSure: {% endif %}"
    )
    monkeypatch.setattr(tokenizer, "chat_template", template)
    pair = PreferencePair((user("Hi?"),), "Hello.", "No.", "x:1")
    with pytest.raises(ChatTemplateError, match="renders the prompt differently"):
        tokenize_pair(tokenizer, pair, max_length=512)


def test_long_eval_prompts_lose_their_earliest_exchanges_to_fit(tokenizer):
    long = "word " * 300
    prompt = [
        {"role": "system", "content": "Be brief."},
        user(long), assistant(long), user("Second question?"), assistant("Sure."), user("Last?"),
    ]  # fmt: skip
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    kept, dropped = fit_prompt(tokenizer, prompt, 100)
    assert dropped == 2 and len(kept) == 4  # the long exchange went, system + rest stayed
    assert kept[0]["role"] == "system" and kept[-1]["content"] == "Last?"
    assert fit_prompt(tokenizer, prompt, 10_000) == (prompt, 0)
    only_last, dropped = fit_prompt(tokenizer, prompt, 5)  # cannot fit: keeps the last turn
    assert [m["content"] for m in only_last] == ["Be brief.", "Last?"] and dropped == 4
    assert full > 100
