"""dispatcher.tool_calling: the tool plan of a chat request, its grammar against a real tokenizer (the tiny decoders'
byte-level BPE), the answer's parsing and streaming split, and earlier tool turns rendered as text."""
from __future__ import annotations

import json

import pytest

from dispatcher.tool_calling import END_TAG, TAG, ToolError, ToolPlan, ToolTurns, tool_plan
from vbert.detokenize import FinishReason
from vbert.structured import compiler_for

pytest.importorskip("llguidance")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"]}}}
CALL = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'


def _walk(plan: ToolPlan, text: str):
    """Feeds text's tokens to a matcher of the plan's grammar: (every token allowed, the end of sequence allowed
    next, the grammar complete)."""
    from tests.decoder_models import tiny_tokenizer
    from vbert.structured import allowed_tokens

    tok = tiny_tokenizer()
    m = compiler_for(tok, len(tok), [tok.eos_token_id]).matcher(plan.structured())
    for t in tok.encode(text, add_special_tokens=False):
        if not bool(allowed_tokens([m], len(tok))[0, t]) or not m.consume(t):
            return False, False, False
    return True, bool(allowed_tokens([m], len(tok))[0, tok.eos_token_id]), m.is_done


def test_auto_allows_text_or_text_then_a_valid_call_and_nothing_after_it():
    plan = tool_plan({"tools": [WEATHER, TIME]})
    assert plan.mode == "auto" and plan.parallel
    assert _walk(plan, "No function fits; it is sunny. a < b") == (True, True, False)         # text, then the end
    assert _walk(plan, f"Let me check. {TAG}{CALL}{END_TAG}") == (True, True, True)           # complete: it ends
    assert _walk(plan, f"{TAG}{CALL[:-1]}, {CALL[1:-1]}]{END_TAG}") == (True, True, True)    # parallel calls
    assert _walk(plan, f'{TAG}[{{"name": "get_weather", "arguments": {{"town": "Paris"}}}}]')[0] is False
    assert _walk(plan, f'{TAG}[{{"name": "delete_all"')[0] is False                       # not a given tool
    assert _walk(plan, f"{TAG} not JSON")[0] is False
    assert _walk(plan, f"{TAG}{CALL}{END_TAG} and more")[0] is False                      # nothing after a call
    assert _walk(plan, f"{TAG}[{' ' * 17}")[0] is False                # JSON whitespace bounded as in any schema
    single = tool_plan({"tools": [WEATHER], "parallel_tool_calls": False})
    assert _walk(single, f"{TAG}{CALL[:-1]}, {CALL[1:-1]}]")[0] is False


def test_required_and_named_start_with_the_call():
    required = tool_plan({"tools": [WEATHER, TIME], "tool_choice": "required"})
    assert _walk(required, "Sure")[0] is False
    assert _walk(required, f'{TAG}[{{"name": "get_time", "arguments": {{"zone": "cet"}}}}]{END_TAG}') == \
        (True, True, True)
    named = tool_plan({"tools": [WEATHER, TIME],
                       "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert (named.mode, named.named) == ("named", "get_weather")
    assert _walk(named, f"{TAG}{CALL}{END_TAG}") == (True, True, True)
    assert _walk(named, f'{TAG}[{{"name": "get_time"')[0] is False
    assert _walk(named, f"{TAG}{CALL[:-1]}, ")[0] is False                                  # one call


def test_parse_splits_content_from_complete_calls():
    plan = tool_plan({"tools": [WEATHER]})
    content, calls = plan.parse(f"Let me check.\n{TAG}{CALL}{END_TAG}")
    assert content == "Let me check."
    (call,) = calls
    assert call["type"] == "function" and call["id"].startswith("call_") and len(call["id"]) == 29
    assert call["function"] == {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}
    assert plan.parse(f"  {TAG}{CALL}{END_TAG}")[0] is None                    # no text before: content null
    assert plan.parse(f"{TAG}{CALL[:-3]}") is None                             # cut by max_tokens: text
    assert plan.parse(f"{TAG}{CALL}") is None
    assert plan.parse(f"{TAG}{CALL}{END_TAG}", FinishReason.LENGTH) is None      # not finished by the grammar
    assert plan.parse("just text") is None and plan.parse(f"{TAG}[]{END_TAG}") is None
    assert plan.parse(f'{TAG}[{{"name": 1, "arguments": {{}}}}]{END_TAG}') is None
    two = plan.parse(f"{TAG}{CALL[:-1]}, {CALL[1:-1]}]{END_TAG}")[1]
    assert len(two) == 2 and two[0]["id"] != two[1]["id"]


@pytest.mark.parametrize("text, upto", [
    ("Hello", 5), ("Hello <", 5), ("Hello <tool_ca", 5), (f"Hello {TAG}[{{", 5), ("a < b", 5), ("Hi  \n", 2),
    ("<tool", 0), ("x <tool_calls", 13),
])
def test_auto_streams_text_up_to_where_a_call_may_begin(text, upto):
    assert tool_plan({"tools": [WEATHER]}).streamable(text) == upto
    assert tool_plan({"tools": [WEATHER], "tool_choice": "required"}).streamable(text) == 0


def test_the_system_message_lists_the_tools_and_the_format_for_the_mode():
    auto, required = tool_plan({"tools": [WEATHER]}), tool_plan({"tools": [WEATHER], "tool_choice": "required"})
    chat = auto.messages((("system", "Be brief."), ("user", "weather?")))
    assert chat[0][0] == "system" and chat[0][1].startswith("Be brief.\n\n") and chat[1:] == (("user", "weather?"),)
    assert '"name":"get_weather"' in chat[0][1] and TAG in chat[0][1] and "answer in text" in chat[0][1]
    assert required.messages((("user", "weather?"),))[0] == ("system", required.system_text())
    assert "answer in text" not in required.system_text()


def test_tool_plan_refusals_name_the_field():
    assert tool_plan({}) is None and tool_plan({"tools": [WEATHER], "tool_choice": "none"}) is None
    for body, param in (
            ({"tool_choice": "auto"}, "tool_choice"),
            ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
            ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
             "tool_choice"),
            ({"tools": [WEATHER, WEATHER]}, "tools"),
            ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0]"),
            ({"tools": [WEATHER, {"type": "function", "function": {"name": "f", "parameters": "x"}}]},
             "tools[1].function.parameters"),
            ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strng"}}}]},
             "tools[0].function.parameters"),
            ({"tools": [WEATHER], "parallel_tool_calls": 1}, "parallel_tool_calls"),
            ({"tools": [{"type": "function", "function": {"name": f"f{i}", "parameters": {"enum": ["d" * 2000]}}}
                        for i in range(40)]}, "tools"),                    # the schemas together past a grammar's size
            ({"tools": [WEATHER] * 65}, "tools")):
        with pytest.raises(ToolError) as e:
            tool_plan(body)
        assert e.value.param == param, (body, str(e.value))


def test_earlier_tool_turns_render_in_the_call_format_and_results_name_their_function():
    turns = ToolTurns()
    call = {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}
    role, text = turns.turn(0, call)
    assert role == "assistant"
    assert text == f'Checking.{TAG}[{{"name": "get_weather", "arguments": {{"city": "Oslo"}}}}]{END_TAG}'
    assert turns.turn(1, {"role": "tool", "tool_call_id": "call_1", "content": "4 C"}) == \
        ("user", "Result of get_weather: 4 C")
    assert turns.turn(2, {"role": "tool", "tool_call_id": "other", "content": "?"}) == ("user", "Result of the call: ?")
    assert turns.turn(3, {"role": "user", "content": "hi"}) is None
    for i, m, param in ((4, {"role": "tool", "content": None}, "messages[4].content"),
                        (5, {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]},
                         "messages[5].tool_calls"),
                        (6, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]},
                         "messages[6].tool_calls")):
        with pytest.raises(ToolError) as e:
            turns.turn(i, m)
        assert e.value.param == param
