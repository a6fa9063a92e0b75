"""Reading the extraction reply: tolerant JSON parsing, a small JSON-schema validator
(the subset the shipped schema uses) and the turn from validated JSON into
`CandidateMemory` values with normalised keys."""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from typing import Any

from sessiond.server.domain.values import CandidateMemory, MemoryCategory

KEY_MAX = 96
CONTENT_MAX = 2000
PROFILE_KEY = "profile"


class BadOutput(Exception):
    """The model's reply cannot be used; the message says why (safe to send back)."""


# ------------------------------------------------------------------ JSON text
_FENCE = re.compile(r"^\s*```[A-Za-z0-9_-]*\s*\n(.*?)\n?\s*```\s*$", re.S)


def parse_json_reply(text: str) -> Any:
    """The JSON value of a reply. Accepts a bare value, one wrapped in a ``` fence,
    or a single object surrounded by prose (as local models without JSON mode do)."""
    stripped = text.strip()
    if not stripped:
        raise BadOutput("the reply is empty")
    fenced = _FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1).strip()
    try:
        return json.loads(stripped)
    except json.JSONDecodeError as first:
        start, end = stripped.find("{"), stripped.rfind("}")
        if 0 <= start < end:
            try:
                return json.loads(stripped[start:end + 1])
            except json.JSONDecodeError:
                pass
        raise BadOutput(f"the reply is not valid JSON ({first.msg} at line {first.lineno} "
                        f"column {first.colno})") from None


# ------------------------------------------------------------------ validator
_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def validate(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """Errors of `value` against `schema` (type, enum, required, properties,
    additionalProperties, items, minLength, maxLength, minItems, maxItems), each
    with a JSON path; [] when valid. Unknown keywords are ignored."""
    errors: list[str] = []
    expected = schema.get("type")
    if expected is not None:
        names = [expected] if isinstance(expected, str) else list(expected)
        ok = False
        for n in names:
            kinds = _TYPES.get(n, ())
            is_bool = isinstance(value, bool)
            if isinstance(value, kinds) and not (is_bool and n in ("integer", "number")):
                ok = True
        if not ok:
            return [f"{path}: expected {' or '.join(names)}, got {_json_type(value)}"]
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(json.dumps(v) for v in schema["enum"])
        errors.append(f"{path}: {json.dumps(value)[:60]} is not one of {allowed}")
    if isinstance(value, str):
        if len(value) < int(schema.get("minLength", 0)):
            errors.append(f"{path}: shorter than {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > int(schema["maxLength"]):
            errors.append(f"{path}: longer than {schema['maxLength']} characters")
    if isinstance(value, dict):
        props: dict[str, Any] = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{path}: missing required property {name!r}")
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            sub = f"{path}.{name}"
            if name in props:
                errors += validate(item, props[name], sub)
            elif extra is False:
                errors.append(f"{path}: unexpected property {name!r}")
            elif isinstance(extra, dict):
                errors += validate(item, extra, sub)
    if isinstance(value, list):
        if len(value) < int(schema.get("minItems", 0)):
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > int(schema["maxItems"]):
            errors.append(f"{path}: more than {schema['maxItems']} items")
        items = schema.get("items")
        if isinstance(items, dict):
            for i, item in enumerate(value):
                errors += validate(item, items, f"{path}[{i}]")
    return errors


def _json_type(value: Any) -> str:
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if name == "null" and value is None:
            return name
        if name == "boolean" and isinstance(value, bool):
            return name
        if not isinstance(value, bool) and isinstance(value, _TYPES[name]):
            return name
    return type(value).__name__


# ------------------------------------------------------------------ memories
def normalize_key(raw: str) -> str:
    """Lowercase, trimmed, runs of anything but letters and digits turned into one
    '_', at most KEY_MAX characters: "Preferred Editor " and "preferred-editor"
    become the same key."""
    key = re.sub(r"[\W_]+", "_", raw.strip().lower()).strip("_")
    return key[:KEY_MAX].rstrip("_")


def _clean(text: str) -> str:
    lines = [" ".join(ln.split()) for ln in text.strip().splitlines()]
    out = "\n".join(ln for ln in lines if ln)
    return out if len(out) <= CONTENT_MAX else out[: CONTENT_MAX - 1].rstrip() + "…"


def candidates_from(doc: Any, schema: dict[str, Any],
                    message_ids: Collection[str]) -> tuple[CandidateMemory, ...]:
    """Validated candidates of an extraction reply.

    Raises BadOutput (with the validation errors) when `doc` does not match the schema.
    Keys are normalised; profile always uses the key "profile" and its lines are
    merged; two items with the same category and key become one (later content wins,
    source ids united). Source ids not in the archive are dropped; an item with empty
    content is skipped; an empty key is derived from the content.
    """
    errors = validate(doc, schema)
    if errors:
        shown = "; ".join(errors[:8])
        more = f" (and {len(errors) - 8} more)" if len(errors) > 8 else ""
        raise BadOutput(f"the JSON does not match the schema: {shown}{more}")
    merged: dict[tuple[MemoryCategory, str], CandidateMemory] = {}
    for item in doc["memories"]:
        category = MemoryCategory(item["category"])
        content = _clean(item["content"])
        if not content:
            continue
        if category is MemoryCategory.PROFILE:
            key = PROFILE_KEY
        else:
            key = normalize_key(item["key"]) or normalize_key(content)
        ids = tuple(dict.fromkeys(i for i in item["source_message_ids"] if i in message_ids))
        old = merged.get((category, key))
        if old is not None:
            if category is MemoryCategory.PROFILE:
                lines = list(dict.fromkeys([*old.content.splitlines(), *content.splitlines()]))
                content = "\n".join(lines)
            ids = tuple(dict.fromkeys([*old.source_message_ids, *ids]))
        merged[(category, key)] = CandidateMemory(category, key, content, ids)
    return tuple(merged.values())
