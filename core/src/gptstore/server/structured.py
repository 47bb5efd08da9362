"""OpenAI's structured outputs and tool calls, as gptstore's constraints and prompts.

``response_format`` becomes a :class:`~gptstore.types.Constraint` the decode loop enforces token
by token (:mod:`gptstore.serving.grammar`). Tools are described to the model in its system
message and answered in the ``<tool_call>`` tags that Hermes-style templates (SmolLM2, Qwen)
use; the answer is constrained to the tools' names and parameter schemas, so every call parses
and its arguments validate. Calls in the history (assistant ``tool_calls``, ``tool`` messages)
are written back in the same tags, so any chat template renders them.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from attrs import frozen

from gptstore.errors import InvalidInput
from gptstore.serving.grammar import JSON_OPTIONS
from gptstore.types import ChatMessage, Constraint, ToolCall

#: OpenAI's rule for function and schema names.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 128
OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)


def _problem(where: str, message: str) -> InvalidInput:
    return InvalidInput("request", [f"{message} @ {where}"])


def response_constraint(response_format: Any) -> Constraint | None:
    """The constraint of OpenAI's ``response_format`` (None for ``{"type": "text"}``)."""
    if response_format is None:
        return None
    where = "$.response_format"
    if not isinstance(response_format, dict):
        raise _problem(where, "response_format must be an object")
    kind = response_format.get("type")
    allowed = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
    if kind not in allowed:
        raise _problem(f"{where}.type", "type must be text, json_object or json_schema")
    extra = sorted(set(response_format) - allowed[kind])
    if extra:
        raise _problem(f"{where}.{extra[0]}", f"unknown field {extra[0]!r} for type {kind}")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint(kind="json_schema", source='{"type": "object"}')
    spec = response_format.get("json_schema")
    where = f"{where}.json_schema"
    if not isinstance(spec, dict):
        raise _problem(where, "json_schema must be an object with a name and a schema")
    extra = sorted(set(spec) - {"name", "description", "schema", "strict"})
    if extra:
        raise _problem(f"{where}.{extra[0]}", f"unknown field {extra[0]!r}")
    if not isinstance(spec.get("name"), str) or not _NAME.match(spec["name"]):
        raise _problem(f"{where}.name", "name must be 1-64 of a-z, A-Z, 0-9, '_' or '-'")
    if spec.get("strict") not in (None, True, False):
        raise _problem(f"{where}.strict", "strict must be a boolean")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise _problem(f"{where}.schema", "schema must be a JSON Schema object")
    return Constraint(kind="json_schema", source=json.dumps(schema))


@frozen
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]


def parse_tools(tools: Any) -> list[Tool]:
    """OpenAI's ``tools`` (functions only), checked with their places named."""
    if tools is None:
        return []
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise _problem("$.tools", f"tools must be a list of at most {MAX_TOOLS} functions")
    parsed, names = [], set()
    for index, tool in enumerate(tools):
        where = f"$.tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise _problem(where, 'each tool must be {"type": "function", "function": {...}}')
        extra = sorted(set(tool) - {"type", "function"})
        if extra:
            raise _problem(f"{where}.{extra[0]}", f"unknown field {extra[0]!r}")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _problem(f"{where}.function", "function must be an object")
        extra = sorted(set(function) - {"name", "description", "parameters", "strict"})
        if extra:
            raise _problem(f"{where}.function.{extra[0]}", f"unknown field {extra[0]!r}")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise _problem(
                f"{where}.function.name", "name must be 1-64 of a-z, A-Z, 0-9, '_' or '-'"
            )
        if name in names:
            raise _problem(f"{where}.function.name", f"two tools are named {name!r}")
        names.add(name)
        description = function.get("description", "")
        if not isinstance(description, str):
            raise _problem(f"{where}.function.description", "description must be a string")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise _problem(f"{where}.function.parameters", "parameters must be a JSON Schema")
        parsed.append(Tool(name, description, parameters))
    return parsed


def tool_choice(choice: Any, tools: list[Tool]) -> str:
    """``none``, ``auto``, ``required``, or the name of the one function to call."""
    if choice is None:
        return "auto" if tools else "none"
    if choice in ("none", "auto", "required"):
        if choice != "none" and not tools:
            raise _problem("$.tool_choice", f"tool_choice {choice!r} needs tools")
        return str(choice)
    function = choice.get("function") if isinstance(choice, dict) else None
    if (
        not isinstance(choice, dict)
        or choice.get("type") != "function"
        or not isinstance(function, dict)
        or not isinstance(function.get("name"), str)
    ):
        raise _problem(
            "$.tool_choice",
            'tool_choice must be none, auto, required or {"type": "function", "function": '
            '{"name": ...}}',
        )
    if function["name"] not in {t.name for t in tools}:
        raise _problem(
            "$.tool_choice.function.name", f"no tool is named {function['name']!r} in tools"
        )
    return str(function["name"])


def _call_schema(tools: list[Tool]) -> dict[str, Any]:
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def tools_constraint(tools: list[Tool], choice: str, parallel: bool) -> Constraint | None:
    """The grammar of an answer: for ``auto``, text (not starting with ``<``) or tool calls; for
    ``required``, one or more calls; for a named function, one call of it."""
    if choice == "none" or not tools:
        return None
    named = [t for t in tools if t.name == choice]
    schema = json.dumps({**_call_schema(named or tools), "x-guidance": JSON_OPTIONS})
    many = parallel and not named
    calls = "call+" if many else "call"
    lines = [
        f"start: {'TEXT | ' if choice == 'auto' else ''}{calls}",
        r"TEXT: /[^<](.|\n)*/",
        f'call: "{OPEN}\\n" %json {schema} "\\n{CLOSE}" "\\n"?',
    ]
    return Constraint(kind="lark", source="\n".join(lines))


def tools_prompt(tools: list[Tool]) -> str:
    """The tools, described for the model (Hermes style, as SmolLM2's and Qwen's templates do)."""
    listed = "\n".join(
        json.dumps(
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.parameters,
                },
            }
        )
        for t in tools
    )
    return (
        "You may call one or more functions to answer. The functions are described in JSON "
        f"Schema within <tools></tools>:\n<tools>\n{listed}\n</tools>\n"
        "To call a function, answer with its name and arguments as a JSON object within "
        f'{OPEN}{CLOSE} tags:\n{OPEN}\n{{"name": <function-name>, "arguments": <args>}}\n{CLOSE}'
    )


def with_tools(messages: list[ChatMessage], tools: list[Tool], choice: str) -> list[ChatMessage]:
    """The messages as any chat template can render them: the tools described in the system
    message (unless tool_choice is none), calls in the history written in their tags, and tool
    results as ``tool`` messages holding ``<tool_response>`` tags."""
    rendered = []
    for message in messages:
        if message.tool_calls:
            calls = "\n".join(
                f'{OPEN}\n{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}\n{CLOSE}'
                for c in message.tool_calls
            )
            content = f"{message.content}\n{calls}" if message.content else calls
            rendered.append(ChatMessage("assistant", content))
        elif message.role == "tool":
            rendered.append(
                ChatMessage("tool", f"<tool_response>\n{message.content}\n</tool_response>")
            )
        else:
            rendered.append(ChatMessage(message.role, message.content))
    if not tools or choice == "none":
        return rendered
    described = tools_prompt(tools)
    if rendered and rendered[0].role == "system":
        return [ChatMessage("system", f"{rendered[0].content}\n\n{described}"), *rendered[1:]]
    return [ChatMessage("system", described), *rendered]


def tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """The text before the first call (None when empty) and the calls in an answer."""
    calls: list[ToolCall] = []
    for match in _CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
        except ValueError:
            continue  # cut off by max_tokens: not a call
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            continue
        arguments = json.dumps(call.get("arguments", {}))
        if any(c.name == call["name"] and c.arguments == arguments for c in calls):
            continue  # a small model may repeat a call word for word: it is made once
        calls.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", call["name"], arguments))
    if not calls:
        return (text or None), []
    before = text[: text.find(OPEN)].strip()
    return (before or None), calls
