"""A legacy completion's logprobs object with echo: the prompt's tokens first (the first with null), the
output's after them, offsets into the returned text, and the echoed prompt in the chunk that scores it."""

from __future__ import annotations

from scheduler.api.routes.inference import _completion_choice_fn, _CompletionLogprobs
from scheduler.engines.base import TokenLogprob

PROMPT = "One, two"


def tok(text: str, logprob: float | None, in_prompt: bool) -> TokenLogprob:
    top = () if logprob is None else ((text, logprob, text.encode()),)
    return TokenLogprob(text, logprob, text.encode(), top, in_prompt=in_prompt)


SCORED = [tok("", None, True), tok("One", -3.0, True), tok(",", -0.5, True), tok(" two", -0.2, True)]


def test_the_prompt_and_the_output_in_one_answer():
    choice = _completion_choice_fn(_CompletionLogprobs(len(PROMPT), 1, True), PROMPT)
    out = choice(",", "length", SCORED + [tok(",", -0.1, False)])
    assert out["text"] == "One, two,"
    lp = out["logprobs"]
    assert lp["tokens"] == ["", "One", ",", " two", ","]
    assert lp["token_logprobs"] == [None, -3.0, -0.5, -0.2, -0.1]
    assert lp["top_logprobs"] == [None, {"One": -3.0}, {",": -0.5}, {" two": -0.2}, {",": -0.1}]
    assert lp["text_offset"] == [0, 0, 3, 4, 8]
    assert all(out["text"][o:].startswith(t) for o, t in zip(lp["text_offset"], lp["tokens"]))


def test_streamed_the_prompt_goes_with_its_scores_then_the_output():
    choice = _completion_choice_fn(_CompletionLogprobs(len(PROMPT), 1, True), PROMPT)
    first = choice(",", None, SCORED + [tok(",", -0.1, False)])
    second = choice(" three", None, [tok(" three", -0.3, False)])
    last = choice("", "length", [])
    assert [c["text"] for c in (first, second, last)] == ["One, two,", " three", ""]
    assert first["logprobs"]["text_offset"] == [0, 0, 3, 4, 8] and second["logprobs"]["text_offset"] == [9]
    # max_tokens 0: the prompt and its scores come with the finish
    choice = _completion_choice_fn(_CompletionLogprobs(len(PROMPT), 0, True), PROMPT)
    only = choice("", "length", SCORED)
    assert only["text"] == PROMPT and only["logprobs"]["token_logprobs"][0] is None
    assert only["logprobs"]["top_logprobs"] is None  # logprobs 0: no alternatives asked for


def test_output_offsets_start_where_the_prompt_ends_whatever_its_pieces_add_up_to():
    # a tokenizer that adds a leading space: the pieces make " One, two", one character more than the prompt
    pieces = [tok("", None, True), tok(" One", -3.0, True), tok(",", -0.5, True), tok(" two", -0.2, True)]
    out = _completion_choice_fn(_CompletionLogprobs(len(PROMPT), 1, True), PROMPT)(",", "length", pieces + [tok(",", -0.1, False)])
    assert out["logprobs"]["text_offset"][-1] == len(PROMPT)
    pieces = [tok("", None, True), tok("One", -3.0, True), tok(" two", -0.2, True)]  # one piece short
    out = _completion_choice_fn(_CompletionLogprobs(len(PROMPT), 1, True), PROMPT)(",", "length", pieces + [tok(",", -0.1, False)])
    assert out["logprobs"]["text_offset"][-1] == len(PROMPT)


def test_echo_without_prompt_scores_keeps_the_output_offsets_after_the_prompt():
    lp = _CompletionLogprobs(len(PROMPT), 1, False)([tok(",", -0.1, False), tok(" three", -0.3, False)])
    assert lp["text_offset"] == [8, 9] and lp["token_logprobs"] == [-0.1, -0.3]


def test_a_token_id_prompt_is_echoed_as_its_tokens_bytes_spell_it():
    # "é" split across two tokens: each piece alone decodes to U+FFFD, the echoed text has the character
    pieces = [TokenLogprob("", None, b"", (), in_prompt=True),
              TokenLogprob("caf", -2.0, b"caf", (("caf", -2.0, b"caf"),), in_prompt=True),
              TokenLogprob("\ufffd", -1.0, b"\xc3", (("\ufffd", -1.0, b"\xc3"),), in_prompt=True),
              TokenLogprob("\ufffd", -0.1, b"\xa9", (("\ufffd", -0.1, b"\xa9"),), in_prompt=True)]
    logprobs = _CompletionLogprobs(0, 1, True)
    choice = _completion_choice_fn(logprobs, None, prefix_from_prompt_tokens=True)
    first = choice(" au", None, pieces + [tok(" au", -0.5, False)])
    assert first["text"] == "café au"
    assert first["logprobs"]["text_offset"][-1] == len("café")  # the output starts where the echoed text ends
    assert choice(" lait", "length", [tok(" lait", -0.2, False)])["text"] == " lait"
