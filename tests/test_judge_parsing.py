"""Reading verdicts from judge replies: thinking skipped, last well-formed verdict wins."""

from __future__ import annotations

import json

from hialign.judge.items import DIMENSIONS
from hialign.judge.parsing import final_answer, normalise_label, parse_verdict


def _verdict(label: str) -> str:
    return json.dumps(dict.fromkeys(DIMENSIONS, label))


def test_plain_json_verdict_is_read():
    parsed = parse_verdict(
        '{"grammar_fluency": "A", "coherence_logic": "B", '
        '"factuality": "tie", "relevance_instruction": "B"}'
    )
    assert parsed.shown == {
        "grammar_fluency": "A",
        "coherence_logic": "B",
        "factuality": "tie",
        "relevance_instruction": "B",
    }
    assert parsed.complete and parsed.method == "json"


def test_thinking_that_mentions_a_before_final_b_gives_b():
    reply = f"<think>Answer A is better: {_verdict('A')}. Hmm, no.</think>\n{_verdict('B')}"
    assert parse_verdict(reply).shown == dict.fromkeys(DIMENSIONS, "B")


def test_unclosed_thinking_has_no_final_answer():
    parsed = parse_verdict(f"<think>so far {_verdict('A')} but let me check")
    assert not parsed.complete
    assert set(parsed.shown.values()) == {"invalid"}
    assert "thinking" in parsed.reason


def test_content_after_a_stray_closing_think_tag_is_the_answer():
    # Some servers put the opening <think> in the prompt, so only the closing tag comes back.
    assert final_answer(f"A is better {_verdict('A')}</think>\n\n{_verdict('tie')}") == _verdict(
        "tie"
    )


def test_last_well_formed_verdict_wins_over_an_earlier_quote():
    reply = f"The user quoted {_verdict('A')} but my final verdict is {_verdict('B')}"
    assert parse_verdict(reply).shown == dict.fromkeys(DIMENSIONS, "B")


def test_incomplete_later_object_does_not_override_a_complete_one():
    reply = f'{_verdict("B")} and a note {{"grammar_fluency": "A"}}'
    assert parse_verdict(reply).shown == dict.fromkeys(DIMENSIONS, "B")


def test_json_in_a_markdown_fence_with_loose_labels():
    reply = (
        "```json\n"
        '{"Grammar & Fluency": "Response A", "Coherence & Logic": "b", '
        '"Factuality": "Tie", "Relevance & Instruction Following": "answer B"}\n```'
    )
    assert parse_verdict(reply).shown == {
        "grammar_fluency": "A",
        "coherence_logic": "B",
        "factuality": "tie",
        "relevance_instruction": "B",
    }


def test_tolerant_lines_when_there_is_no_json():
    reply = (
        "**Grammar & Fluency**: A\nCoherence & Logic: tie\nFactuality: B\n"
        "Relevance & Instruction Following: A\nOn reflection, factuality: A"
    )
    parsed = parse_verdict(reply)
    assert parsed.method == "tolerant"
    assert parsed.shown == {
        "grammar_fluency": "A",
        "coherence_logic": "tie",
        "factuality": "A",
        "relevance_instruction": "A",
    }


def test_malformed_reply_is_invalid_not_a_tie():
    parsed = parse_verdict('{"verdict" "unsure",, grammar => ???')
    assert not parsed.complete
    assert set(parsed.shown.values()) == {"invalid"}


def test_partial_reply_keeps_what_it_states_and_marks_the_rest_invalid():
    parsed = parse_verdict("grammar_fluency: B\nfactuality: A")
    assert parsed.shown == {
        "grammar_fluency": "B",
        "coherence_logic": "invalid",
        "factuality": "A",
        "relevance_instruction": "invalid",
    }
    assert "coherence_logic" in parsed.reason


def test_label_normalisation():
    assert normalise_label("A") == "A"
    assert normalise_label(" response_b ") == "B"
    assert normalise_label("B is better.") == "B"
    assert normalise_label("Equal") == "tie"
    assert normalise_label({"winner": "a", "reason": "clearer"}) == "A"
    assert normalise_label("both are bad") is None
    assert normalise_label(3) is None


def test_empty_reply_is_invalid():
    assert not parse_verdict(None).complete
    assert not parse_verdict("").complete
