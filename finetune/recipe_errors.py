"""Turn pydantic validation errors into messages a recipe author can act on.

Each message names the key path, the line in the file where known, what was wrong, and for
unknown keys the closest valid key ("did you mean").
"""

from __future__ import annotations

import difflib
import typing

import yaml


def line_index(text: str) -> dict[tuple, int]:
    """Map each key path in a YAML document to its 1-based line number."""
    index: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = (*path, key.value)
                index[child] = key.start_mark.line + 1
                walk(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                index[(*path, i)] = item.start_mark.line + 1
                walk(item, (*path, i))

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, ())
    return index


def describe_validation_error(exc, model_cls, lines: dict, prefix: tuple = ()) -> list[str]:
    """One message per error of a pydantic ValidationError (anything else: its text)."""
    if not hasattr(exc, "errors"):
        return [f"{'.'.join(prefix) or 'recipe'}: {exc}"]
    problems = []
    for error in exc.errors():
        loc = tuple(part for part in error["loc"] if part not in ("function-after",))
        path = (*prefix, *loc)
        key = ".".join(str(p) for p in path) or "recipe"
        line = lines.get(path) or _nearest_line(lines, path)
        where = f" (line {line})" if line else ""
        kind = error["type"]
        if kind == "extra_forbidden":
            choices = sorted(_fields_at(model_cls, loc[:-1]))
            hint = difflib.get_close_matches(str(loc[-1]), choices, n=1)
            suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
            if "token" in str(loc[-1]).lower():  # the run directory keeps a copy of the recipe
                suggestion = "; never write a token into a recipe: set HF_TOKEN or run `hf auth login`."
            problems.append(f"{key}: unknown key{where}{suggestion} Valid keys here: {', '.join(choices)}")
        elif kind == "missing":
            problems.append(f"{key}: required key is missing{where}")
        else:
            received = f" (got {error['input']!r})" if "input" in error and not isinstance(error["input"], dict) else ""
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{key}: {message}{received}{where}")
    return problems


def _nearest_line(lines: dict, path: tuple) -> int | None:
    while path:
        path = path[:-1]
        if path in lines:
            return lines[path]
    return None


def _fields_at(model_cls, loc: tuple) -> list[str]:
    """The valid keys of the model nested at `loc` inside `model_cls`."""
    current = model_cls
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = _model_in(field.annotation)
        if current is None:
            return []
    return [name for name, f in current.model_fields.items() if not f.exclude]


def _model_in(annotation):
    """The pydantic model inside an annotation such as `EarlyStopping | None`."""
    if hasattr(annotation, "model_fields"):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
