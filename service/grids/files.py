"""Reading a grid file safely: bounded size, nesting and aliases, and no duplicate keys.

A grid is a few kilobytes of YAML, JSON or TOML that a person wrote; anything far
from that is refused before it can cost time or memory: a file over
``MAX_GRID_BYTES``, nesting deeper than ``MAX_DEPTH`` (checked on the text for JSON
and TOML, while composing for YAML, so Python's recursion limit is never met),
more than ``MAX_ALIASES`` YAML aliases (a "billion laughs" file expands each one),
and a key written twice in one mapping (YAML and JSON would keep the last one
silently; TOML refuses it too).
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.events import AliasEvent
from yaml.nodes import MappingNode

from service.exceptions import GridError
from service.grids.spec import short_repr

#: Largest grid file read (a grid is a few kilobytes).
MAX_GRID_BYTES = 1 << 20
#: Deepest nesting of lists and mappings in a grid (real ones stay under 6).
MAX_DEPTH = 32
#: Most YAML aliases (``*name``) in one grid.
MAX_ALIASES = 64
GRID_SUFFIXES = (".yaml", ".yml", ".json", ".toml")


class _GridLoader(yaml.SafeLoader):
    """PyYAML's safe loader with bounded depth and aliases, and duplicate keys refused."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                event = self.peek_event()
                raise ComposerError(
                    None, None, f"more than {MAX_ALIASES} aliases (*name)", event.start_mark
                )
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                event = self.peek_event()
                raise ComposerError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # an unhashable key: the base constructor says so
            if duplicate:
                raise ConstructorError(
                    None, None, f"duplicate key {short_repr(key)}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_GridLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _GridLoader.construct_mapping
)


class _DuplicateKey(ValueError):
    """A JSON object with a key twice."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"duplicate key {short_repr(key)}")
        out[key] = value
    return out


def _bracket_depth(text: str, *, toml: bool) -> int:
    """Deepest nesting of [ and { outside strings (and TOML comments), on the raw text."""
    depth = deepest = 0
    quote = ""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if quote:
            if c == "\\" and quote in ('"', '"""'):
                i += 2
                continue
            if text.startswith(quote, i):
                i += len(quote)
                quote = ""
                continue
        elif c in "\"'":
            quote = c * 3 if toml and text.startswith(c * 3, i) else c
            i += len(quote)
            continue
        elif toml and c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
        i += 1
    return deepest


def read_grid_file(path: Path) -> dict[str, Any]:
    """The mapping in a YAML, JSON or TOML grid file; GridError (one line) if it is not one."""
    source = str(path)
    suffix = path.suffix.lower()
    if suffix not in GRID_SUFFIXES:
        raise GridError(f"{source}: expected a .yaml, .yml, .json or .toml grid file")
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_GRID_BYTES + 1)
    except FileNotFoundError:
        raise GridError(f"{source}: no such file") from None
    except OSError as exc:
        raise GridError(f"{source}: cannot read the file ({exc})") from None
    if len(raw) > MAX_GRID_BYTES:
        raise GridError(f"{source}: larger than {MAX_GRID_BYTES >> 20} MiB; a grid is a few KB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GridError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_grid_text(text, suffix, source)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 80 else line[:77] + "..."


def parse_grid_text(text: str, suffix: str, source: str) -> dict[str, Any]:
    """The mapping ``text`` holds in the format of ``suffix``; GridError if it is not one."""
    if suffix in (".json", ".toml") and _bracket_depth(text, toml=suffix == ".toml") > MAX_DEPTH:
        raise GridError(f"{source}: nested deeper than {MAX_DEPTH} levels")
    try:
        if suffix == ".json":
            data = json.loads(text, object_pairs_hook=_no_duplicates)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.load(text, Loader=_GridLoader)
    except json.JSONDecodeError as exc:
        raise GridError(f"{source}: line {exc.lineno}: invalid JSON: {exc.msg}") from None
    except _DuplicateKey as exc:
        raise GridError(f"{source}: invalid JSON: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise GridError(f"{source}: invalid TOML: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise GridError(f"{source}: {line}invalid YAML: {problem}") from None
    except RecursionError:
        raise GridError(f"{source}: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        if "integer string conversion" in str(exc):  # Python's bound on integer literals
            raise GridError(
                f"{source}: an integer of more than {sys.get_int_max_str_digits():,} digits; "
                "integers in a grid are at most 2,147,483,647"
            ) from None
        raise GridError(f"{source}: invalid value: {_first_line(exc)}") from None
    if data is None:
        raise GridError(f"{source}: the file is empty; expected a grid (datasets, optimizers, ...)")
    if not isinstance(data, dict):
        raise GridError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    return data
