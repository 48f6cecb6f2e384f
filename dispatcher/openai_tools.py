"""OpenAI tool calling on /v1/chat/completions, where a grammar can guarantee the call (as vLLM does without a
model-specific tool parser): `tool_choice: "required"` (one or more calls of the given tools) or
`{"type": "function", "function": {"name": N}}` (one call of N, its arguments following N's parameters schema).
`"none"` answers in text; `"auto"` (OpenAI's default with tools: the model decides between text and a call) is
refused, since telling a call from text needs a parser of the model's own format.

The tools reach the model as a system message (the tools' names, descriptions and parameter schemas, appended to
the request's own system message or placed first), for any chat template; earlier turns' assistant tool calls and
tool results are rendered as text turns. The answer is generated under the call's JSON Schema
(vbert.structured) and returned as `tool_calls` with ids of our own.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from manager.errors import InvalidArgumentError
from vbert.structured import StructuredOutput

MAX_TOOLS = 64
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ToolError(InvalidArgumentError):
    """A bad tools / tool_choice / tool message field; `param` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class ToolPlan:
    """The request's tools ({"name", "description", "parameters"}), the forced function (None: "required") and
    whether one answer may hold several calls (OpenAI's parallel_tool_calls)."""
    tools: tuple[dict, ...]
    named: str | None
    parallel: bool = True

    def structured(self) -> StructuredOutput:
        if self.named is not None:
            return StructuredOutput("json", json.dumps(self._parameters(self.named)))
        calls = [{"type": "object", "properties": {"name": {"const": t["name"]}, "arguments": t["parameters"]},
                  "required": ["name", "arguments"], "additionalProperties": False} for t in self.tools]
        array = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not self.parallel:
            array["maxItems"] = 1
        return StructuredOutput("json", json.dumps(array))

    def _parameters(self, name: str) -> dict:
        return next(t["parameters"] for t in self.tools if t["name"] == name)

    def system_text(self) -> str:
        listed = "\n".join(json.dumps({"name": t["name"], **({"description": t["description"]} if t["description"]
                                                              else {}), "parameters": t["parameters"]},
                                       separators=(",", ":")) for t in self.tools)
        if self.named is not None:
            how = f"Call {self.named}: answer with its arguments as a JSON object."
        else:
            how = 'Call them: answer with a JSON array of {"name":...,"arguments":{...}}.'
        return f"Functions:\n{listed}\n{how}"

    def messages(self, messages: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        """The chat with the tools described in its system message."""
        if messages and messages[0][0] == "system":
            return (("system", f"{messages[0][1]}\n\n{self.system_text()}"),) + messages[1:]
        return (("system", self.system_text()),) + messages

    def calls(self, text: str) -> list[dict] | None:
        """The answer as OpenAI tool_calls; None when it is not a complete call (cut by max_tokens)."""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        pairs = [(self.named, value)] if self.named is not None else [(c["name"], c["arguments"]) for c in value]
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": name, "arguments": json.dumps(args)}} for name, args in pairs]


def tool_plan(body: dict) -> ToolPlan | None:
    """The chat request's tool plan, or None for a text answer; ToolError naming the field."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools:
        if choice not in (None, "none"):
            raise ToolError("tool_choice", "needs tools")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise ToolError("tools", f"expected a list of at most {MAX_TOOLS} tools")
    parsed = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not NAME.match(fn["name"]):
            raise ToolError(f"tools[{i}]", 'expected {"type": "function", "function": {"name": [A-Za-z0-9_-]{1,64}, '
                                           '"description": ..., "parameters": a JSON Schema}}')
        parameters = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise ToolError(f"tools[{i}].function.parameters", "expected a JSON Schema object")
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise ToolError(f"tools[{i}].function.description", "expected a string")
        parsed.append({"name": fn["name"], "description": description, "parameters": parameters})
    names = [t["name"] for t in parsed]
    if len(set(names)) != len(names):
        raise ToolError("tools", "two tools have the same name")
    if choice is None or choice == "auto":
        raise ToolError("tool_choice", "'auto' (the default with tools) is not supported: telling a call from text "
                                       "needs a parser of the model's own format; send \"required\" or "
                                       '{"type": "function", "function": {"name": ...}}, or "none"')
    if choice == "none":
        return None
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ToolError("parallel_tool_calls", "expected a boolean")
    if choice == "required":
        return ToolPlan(tuple(parsed), None, parallel)
    name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) \
        and choice.get("type") == "function" else None
    if name not in names:
        raise ToolError("tool_choice", f'expected "none", "required" or {{"type": "function", "function": {{"name": '
                                       f'one of {names}}}}}, got {choice!r}')
    return ToolPlan(tuple(parsed), name, parallel)


def tool_turns(i: int, m: dict) -> tuple[str, str] | None:
    """An earlier turn about tools as a text turn: an assistant's tool_calls (content null) as the JSON it would
    have answered, a tool result as a user turn naming its call. None for any other message."""
    if m.get("role") == "tool":
        content = m.get("content")
        if not isinstance(content, str):
            raise ToolError(f"messages[{i}].content", "a tool message needs its result as a string")
        call = m.get("tool_call_id")
        return "user", f"Result of the call {call}: {content}" if call else f"Result of the call: {content}"
    calls = m.get("tool_calls") if m.get("role") == "assistant" else None
    if not calls:
        return None
    try:
        rendered = [{"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments")),
                     "id": c.get("id")} for c in calls]
    except (KeyError, TypeError, ValueError):
        raise ToolError(f"messages[{i}].tool_calls", "expected [{\"id\", \"function\": {\"name\", \"arguments\": "
                                                     "a JSON string}}]") from None
    return "assistant", json.dumps(rendered)


def _arguments(value):
    """A call's arguments as sent back: OpenAI's JSON string (a dict, as some clients send, taken as is)."""
    return value if isinstance(value, dict) else json.loads(value or "{}")
