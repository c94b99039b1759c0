"""Tools and tool calls as the JSON Ollama's template engine prints, byte for byte.

A TEMPLATE sees a tool as Ollama's template-side struct: ``{{ json .Function }}`` prints its function with the
keys in a fixed order (name, description — always there —, parameters), the schema reduced to the fields
Ollama keeps (anything else, such as ``default`` or ``minimum``, is gone), the parameters' properties
sorted by name (a plain Go map) while a property's own nested ``properties`` keep their order (an
insertion-ordered map). A call's ``{{ .Function.Arguments }}`` is a plain Go map too: keys sorted at every
depth. Go's ``json.Marshal`` writes compact JSON, escapes ``<``, ``>``, ``&``, U+2028 and U+2029, keeps the
rest of Unicode as UTF-8, and reads every number as a float64: 5.0 prints as ``5``, 1e-7 as ``1e-7``.

Training, query and evaluation give a chat template these strings (``render_form``), so the prompt a model
learns on is the prompt Ollama builds for it.
"""

from __future__ import annotations

import math
from decimal import Decimal

# Go writes these as escapes; everything else below U+0020 as \u00XX (lowercase hex), as Go >= 1.22 does
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f",
            "<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def _go_string(text: str) -> str:
    out = ['"']
    for ch in text:
        escaped = _ESCAPES.get(ch)
        if escaped is not None:
            out.append(escaped)
        elif ch < " ":
            out.append(f"\\u{ord(ch):04x}")
        elif "\ud800" <= ch <= "\udfff":  # a lone surrogate cannot reach Go: its JSON decoder makes it U+FFFD
            out.append("\ufffd")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _go_number(value: int | float) -> str:
    """A JSON number as Go prints the float64 it decodes to: the shortest digits that read back the same,
    in plain notation unless it is below 1e-6 or from 1e21 up (then 1e-7, 1.5e+21)."""
    number = float(value)  # raises OverflowError past float64, where Go's decoder refuses the number too
    if math.isnan(number) or math.isinf(number):
        raise ValueError(f"{value!r} is not a JSON number (Go's json.Marshal refuses NaN and infinities)")
    sign, digit_tuple, exponent = Decimal(repr(number)).as_tuple()
    minus = "-" if sign else ""
    digits = "".join(map(str, digit_tuple))
    significant = digits.rstrip("0")
    if not significant:
        return minus + "0"
    exponent += len(digits) - len(significant)
    digits = significant
    scientific = len(digits) - 1 + exponent  # the power of ten of the first digit
    if abs(number) < 1e-6 or abs(number) >= 1e21:
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        power = f"{abs(scientific):02d}" if scientific >= 0 else str(abs(scientific))  # Go trims e-07 to e-7
        return f"{minus}{mantissa}e{'-' if scientific < 0 else '+'}{power}"
    if exponent >= 0:
        return minus + digits + "0" * exponent
    point = len(digits) + exponent
    if point > 0:
        return minus + digits[:point] + "." + digits[point:]
    return minus + "0." + "0" * -point + digits


def go_json(value, sort_keys: bool) -> str:
    """The bytes Go's ``json.Marshal`` writes for a plain JSON value. ``sort_keys``: objects are Go maps
    (``map[string]any``), whose keys it sorts; otherwise they keep their order, as a struct or an
    insertion-ordered map does."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _go_string(value)
    if isinstance(value, (int, float)):
        return _go_number(value)
    if isinstance(value, dict):
        keys = sorted(value) if sort_keys else list(value)
        return "{" + ",".join(_go_string(str(k)) + ":" + go_json(value[k], sort_keys) for k in keys) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(go_json(v, sort_keys) for v in value) + "]"
    raise TypeError(f"{type(value).__name__} is not a JSON value")


def _sorted(value):
    """A value Go holds as ``any`` (decoded from JSON): every object in it a map, so sorted."""
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def _strings(value) -> list[str] | None:
    """A ``[]string`` field: a list of strings, or nothing (Go would refuse anything else)."""
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _property(schema) -> dict:
    """A property's schema as Ollama's ToolProperty marshals it: anyOf, type, items, description, enum,
    properties, required, each only when set; ``type`` a string when there is one, a list when several."""
    if not isinstance(schema, dict):
        return {}
    out: dict = {}
    if isinstance(schema.get("anyOf"), list) and schema["anyOf"]:
        out["anyOf"] = [_property(s) for s in schema["anyOf"]]
    kind = schema.get("type")
    if isinstance(kind, str):
        out["type"] = kind
    elif _strings(kind):
        out["type"] = kind[0] if len(kind) == 1 else list(kind)
    if schema.get("items") is not None:
        out["items"] = _sorted(schema["items"])
    if isinstance(schema.get("description"), str) and schema["description"]:
        out["description"] = schema["description"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        out["enum"] = [_sorted(v) for v in schema["enum"]]
    if isinstance(schema.get("properties"), dict):  # insertion-ordered, and kept even when empty
        out["properties"] = {k: _property(v) for k, v in schema["properties"].items()}
    if _strings(schema.get("required")):
        out["required"] = list(schema["required"])
    return out


def canonical_function(function: dict) -> dict:
    """A tool's function reduced and ordered as Ollama's template-side tool marshals it (the dict's order is
    Go's output order): name, description, parameters {type, $defs, items, required, properties}."""
    parameters = function.get("parameters")
    parameters = parameters if isinstance(parameters, dict) else {}
    shown: dict = {"type": parameters.get("type") if isinstance(parameters.get("type"), str) else ""}
    for key in ("$defs", "items"):
        if parameters.get(key) is not None:
            shown[key] = _sorted(parameters[key])
    if _strings(parameters.get("required")):
        shown["required"] = list(parameters["required"])
    properties = parameters.get("properties")
    shown["properties"] = ({k: _property(properties[k]) for k in sorted(properties)}
                           if isinstance(properties, dict) else None)  # a nil Go map prints as null
    name, description = function.get("name"), function.get("description")
    return {"name": name if isinstance(name, str) else "",
            "description": description if isinstance(description, str) else "", "parameters": shown}


def function_json(function: dict) -> str:
    """What ``{{ json .Function }}`` prints for this tool in Ollama."""
    return go_json(canonical_function(function), sort_keys=False)


def arguments_json(arguments: dict | None) -> str:
    """What ``{{ .Function.Arguments }}`` prints for a call with these arguments in Ollama."""
    return go_json(arguments or {}, sort_keys=True)


def render_form(conversation) -> tuple[list[dict], list[dict] | None]:
    """A canonical conversation (``forge.records.Conversation``) as Forge gives it to a chat template: each
    tool ``{"type": "function", "function": <function_json>}`` and each call's arguments ``arguments_json``,
    as strings a Forge template prints as they are. Tools None when the conversation declares none."""
    messages = []
    for message in conversation:
        shown = dict(message)
        if message.get("tool_calls"):
            shown["tool_calls"] = [
                {"type": "function", "function": {"name": call["function"]["name"],
                                                  "arguments": arguments_json(call["function"].get("arguments"))}}
                for call in message["tool_calls"]]
        messages.append(shown)
    tools = getattr(conversation, "tools", None)
    if tools is None:
        return messages, None
    return messages, [{"type": "function", "function": function_json(tool["function"])} for tool in tools]
