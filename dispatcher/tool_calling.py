"""Tool calling, for both protocols (OpenAI's on /v1/chat/completions; gRPC Generate's tools, given here in OpenAI's
shape by dispatcher/generate_rpc.py): `tools` with `tool_choice` "auto" (OpenAI's default with tools: the model
answers in text or calls), "required" (one or more calls) or `{"type": "function", "function": {"name": N}}` (one
call of N); "none" answers in text.

One call format for every mode and every turn, the tagged JSON list that SmolLM2-Instruct was tuned on (APIGen
function-calling data) and that Hermes-style models write: `<tool_call>[{"name": ..., "arguments": {...}}]</tool_call>`.
The tools reach the model as a system message (their names, descriptions and parameter schemas inside `<tools>`,
appended to the request's own system message or placed first), with the format. The answer is generated under a
grammar (vbert.structured, a Lark grammar for llguidance), so a call is always a valid call:
- "auto": any text, or text then `<tool_call>`; once the model has written the tag, the rest is forced to a JSON list
  of calls of the given tools whose arguments follow their schemas, then `</tool_call>`, and the answer ends there;
- "required" and a named function: the answer starts with the tag (forced), the list holds calls of the given tools
  (of N only, one call, for a named function).
`parse` splits an answer into its text before the tag (the message's content; None when empty) and the calls
(OpenAI tool_calls with ids of our own); an answer cut before `</tool_call>` stays text. Earlier turns' assistant
tool_calls are rendered in the same format, tool results as user turns naming the function.
"""
from __future__ import annotations

import dataclasses
import json
import re
import uuid
from dataclasses import dataclass

from manager.errors import InvalidArgumentError
from vbert.detokenize import FinishReason
from vbert.structured import JSON_OPTIONS, StructuredOutput

from .generation_call import GenerateParams

MAX_TOOLS = 64
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TAG, END_TAG = "<tool_call>", "</tool_call>"
MODES = ("auto", "required", "named")


class ToolError(InvalidArgumentError):
    """A bad tools / tool_choice / tool message field; `param` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class ToolPlan:
    """The request's tools ({"name", "description", "parameters"}), the mode ("auto", "required", "named"), the
    forced function of "named", and whether one answer may hold several calls (OpenAI's parallel_tool_calls)."""
    tools: tuple[dict, ...]
    mode: str = "auto"
    named: str | None = None
    parallel: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES or (self.mode == "named") != (self.named is not None):
            raise ValueError(f"ToolPlan: mode must be one of {MODES}, with a name exactly for 'named'")

    def _calls_schema(self) -> dict:
        """The JSON Schema of the list inside the tags (JSON whitespace bounded as for any schema)."""
        tools = [t for t in self.tools if self.named is None or t["name"] == self.named]
        calls = [{"type": "object", "properties": {"name": {"const": t["name"]}, "arguments": t["parameters"]},
                  "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
        schema = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
        if self.named is not None or not self.parallel:
            schema["maxItems"] = 1
        return {**schema, "x-guidance": JSON_OPTIONS}

    def structured(self) -> StructuredOutput:
        """The answer's grammar (Lark, llguidance's dialect: %json inlines a schema; a lazy rule ends at the first
        tag, so "auto" text may be anything up to it)."""
        body = f"%json {json.dumps(self._calls_schema())} {json.dumps(END_TAG)}"
        if self.mode == "auto":
            lark = ("start: TEXT | text_then_call\n"
                    f"text_then_call: text_to_tag {body}\n"
                    f"text_to_tag[lazy]: TEXT {json.dumps(TAG)}\n"
                    "TEXT: /(.|\\n)*/\n")
        else:
            lark = f"start: {json.dumps(TAG)} {body}\n"
        return StructuredOutput("grammar", "%llguidance {}\n" + lark)

    def system_text(self) -> str:
        listed = "\n".join(json.dumps({"name": t["name"], **({"description": t["description"]} if t["description"]
                                                              else {}), "parameters": t["parameters"]},
                                       separators=(",", ":")) for t in self.tools)
        one = "a list of one call" if self.named is not None or not self.parallel else "a list of calls"
        fmt = f'{TAG}[{{"name": "<function name>", "arguments": {{<its arguments>}}}}]{END_TAG} ({one})'
        if self.mode == "auto":
            how = (f"To call functions, answer with {fmt} and nothing after it. "
                   "If no function fits the request, answer in text.")
        elif self.mode == "required":
            how = f"Answer with {fmt}."
        else:
            how = f"Call {self.named}: answer with {fmt}."
        return f"You can call these functions:\n<tools>\n{listed}\n</tools>\n{how}"

    def messages(self, messages: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        """The chat with the tools described in its system message."""
        if messages and messages[0][0] == "system":
            return (("system", f"{messages[0][1]}\n\n{self.system_text()}"),) + messages[1:]
        return (("system", self.system_text()),) + messages

    def parse(self, text: str, finish_reason: FinishReason = FinishReason.STOP) -> tuple[str | None, list[dict]] | None:
        """(content, tool_calls) of an answer that holds a complete call; None when it holds none (a text answer,
        or a call cut by max_tokens or a stop string: the answer stays text; any finish but STOP: None)."""
        if finish_reason is not FinishReason.STOP:
            return None
        start = text.find(TAG)
        end = text.find(END_TAG, start + len(TAG)) if start >= 0 else -1
        if end < 0:
            return None
        try:
            value = json.loads(text[start + len(TAG):end])
            pairs = [(c["name"], c["arguments"]) for c in value]
        except (ValueError, TypeError, KeyError):
            return None
        if not pairs or not all(isinstance(n, str) and isinstance(a, dict) for n, a in pairs):
            return None
        content = text[:start].rstrip() or None
        return content, [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": name, "arguments": json.dumps(args)}} for name, args in pairs]

    def streamable(self, text: str) -> int:
        """How much of an answer so far can be streamed as content: "auto" text up to the tag, less any tail that
        may be the tag's beginning and trailing whitespace (content stops before a call); nothing in the other
        modes."""
        if self.mode != "auto":
            return 0
        start = text.find(TAG)
        if start < 0:
            start = len(text)
            for k in range(min(len(TAG) - 1, len(text)), 0, -1):
                if text.endswith(TAG[:k]):
                    start -= k
                    break
        return len(text[:start].rstrip())


def tool_plan(body: dict) -> ToolPlan | None:
    """The chat request's tool plan, or None for a text answer; ToolError naming the field."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools:
        if choice not in (None, "none"):
            raise ToolError("tool_choice", "needs tools")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise ToolError("tools", f"expected a list of at most {MAX_TOOLS} tools")
    parsed = [_tool(i, t) for i, t in enumerate(tools)]
    names = [t["name"] for t in parsed]
    if len(set(names)) != len(names):
        raise ToolError("tools", "two tools have the same name")
    if choice == "none":
        return None
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ToolError("parallel_tool_calls", "expected a boolean")
    if choice is None or choice in ("auto", "required"):
        plan = ToolPlan(tuple(parsed), choice or "auto", None, parallel)
    else:
        name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) \
            and choice.get("type") == "function" else None
        if name not in names:
            raise ToolError("tool_choice", f'expected "auto", "none", "required" or {{"type": "function", '
                                           f'"function": {{"name": one of {names}}}}}, got {choice!r}')
        plan = ToolPlan(tuple(parsed), "named", name, parallel)
    try:
        plan.structured()
    except ValueError as e:                # the tools' schemas together past a grammar's size
        raise ToolError("tools", str(e)) from None
    return plan


def with_tools(params: GenerateParams, plan: ToolPlan | None) -> GenerateParams:
    """The call's parameters with the plan's tools in its chat's system message and the answer under its grammar."""
    if plan is None:
        return params
    if params.structured is not None:
        raise ToolError("tools", "give tools or a structured output (response_format, ...), not both")
    if params.messages is None:
        raise ToolError("tools", "tools need a chat (messages), not a prompt")
    return dataclasses.replace(params, messages=plan.messages(params.messages), structured=plan.structured())


def _tool(i: int, t) -> dict:
    """One tool of the request as {"name", "description", "parameters"}; its parameters must be a JSON Schema that
    compiles (checked without a tokenizer: the error names the tool)."""
    from llguidance import LLMatcher

    fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not NAME.match(fn["name"]):
        raise ToolError(f"tools[{i}]", 'expected {"type": "function", "function": {"name": [A-Za-z0-9_-]{1,64}, '
                                       '"description": ..., "parameters": a JSON Schema}}')
    parameters = fn.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise ToolError(f"tools[{i}].function.parameters", "expected a JSON Schema object")
    try:
        bad, errors = LLMatcher.validate_grammar_with_warnings(
            LLMatcher.grammar_from_json_schema(parameters, defaults=JSON_OPTIONS))
    except ValueError as e:
        bad, errors = True, [str(e)]
    if bad:
        raise ToolError(f"tools[{i}].function.parameters", " ".join(errors[0].split())[:300])
    description = fn.get("description") or ""
    if not isinstance(description, str):
        raise ToolError(f"tools[{i}].function.description", "expected a string")
    return {"name": fn["name"], "description": description, "parameters": parameters}


class ToolTurns:
    """Earlier turns about tools as text turns, in the order of the chat: an assistant's tool_calls (its content,
    then the calls as the model would have written them), a tool result as a user turn naming the function of its
    call (known from the assistant turn that made it)."""

    def __init__(self):
        self._names: dict[str, str] = {}

    def turn(self, i: int, m: dict) -> tuple[str, str] | None:
        """Message i as a text turn, or None when it is not about tools."""
        if m.get("role") == "tool":
            content = m.get("content")
            if not isinstance(content, str):
                raise ToolError(f"messages[{i}].content", "a tool message needs its result as a string")
            name = self._names.get(m.get("tool_call_id"))
            return "user", f"Result of {name}: {content}" if name else f"Result of the call: {content}"
        calls = m.get("tool_calls") if m.get("role") == "assistant" else None
        if not calls:
            return None
        try:
            rendered = [{"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments"))}
                        for c in calls]
        except (KeyError, TypeError, ValueError):
            raise ToolError(f"messages[{i}].tool_calls", "expected [{\"id\", \"function\": {\"name\", \"arguments\": "
                                                         "a JSON string}}]") from None
        for c, r in zip(calls, rendered):
            if isinstance(c.get("id"), str):
                self._names[c["id"]] = r["name"]
        content = m.get("content") if isinstance(m.get("content"), str) else ""
        return "assistant", f"{content}{TAG}{json.dumps(rendered)}{END_TAG}"


def _arguments(value):
    """A call's arguments as sent back: OpenAI's JSON string (a dict, as some clients send, taken as is)."""
    return value if isinstance(value, dict) else json.loads(value or "{}")
