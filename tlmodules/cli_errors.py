"""One-line messages for the mistakes a user makes on ``train.py``'s command line or in its YAML.

jsonargparse reports a bad value inside a ``class_path``/``init_args`` block as a "Does not validate against
any of the Union subtypes" report: every member of the Union it tried, then a dump of the value. The one line
in it that matters (``Option 'lrr' is not accepted``) is rewritten here into ``<key>: <problem>; <fix>``.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import yaml

from tlmodules.errors import UserError

DEBUG_VARIABLE = "TLMODULES_DEBUG"

_NOISE = re.compile(
    r"^(-\s*)?("
    r"Does not validate against any of the Union subtypes"
    r"|Subtypes: .*"
    r"|Errors:"
    r"|Expected a <class '(NoneType|bool)'>"
    r"|Expected a collections\.abc\.Iterable.*"
    r"|Expected a path but .*"
    r"|Given value type: .*"
    r"|Given value: .*"
    r")$"
)
_PARSER_KEY = re.compile(r'^(-\s*)?Parser key "([^"]+)":\s*(.*)$')
_CLASS_PATH = re.compile(r"^(-\s*)?Problem with given class_path '([^']+)':\s*(.*)$")
_REPORT_MARKERS = ("Parser key", "Union subtypes", "class_path", "does not accept option", "Expected a")
_NOT_ACCEPTED = re.compile(r"^Option '([^']+)' is not accepted$")
_EXPECTED = re.compile(r"^Expected an? (.+?)\. Got value: (.*)$")
# a union type's report (an optional argument: ``Literal[...] | None``, ``float | None``) lists what each member
# expected and the given value on lines of their own
_UNION_MEMBER = re.compile(r"^-\s*Expected an? (.+)$")
_GIVEN_VALUE = re.compile(r"^Given value: (?:NestedArg\(key='[^']*', val=(.*)\)|(.*))$")  # command line | YAML


class CommandLineError(UserError):
    """An argument or YAML key that the command line cannot accept."""


def describe_type(expected: str) -> str:
    """``typing.Literal['a', 'b']`` → ``one of 'a', 'b'``; ``<class 'int'>`` → ``an integer``."""
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", expected)
    if literal:
        return f"one of {literal.group(1)}"
    simple = re.fullmatch(r"<class '(\w+)'>", expected)
    names = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false", "NoneType": "null"}
    if simple:
        return names.get(simple.group(1), f"a {simple.group(1)}")
    return expected


def _literal(text: str) -> Any:
    """A Python literal's value (``'inverse'`` → ``inverse``); the text itself when it is not one."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def class_arguments(class_path: str) -> list[str]:
    """The constructor's argument names of ``class_path`` (empty when it cannot be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    except (ImportError, AttributeError, TypeError, ValueError):
        return []


def did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def simplify_parser_message(message: str, subcommand: str | None = None) -> str:
    """The one meaningful line of a jsonargparse error report, prefixed by the full key it concerns; a message
    that is not such a report (tlmodules' own, e.g. about ``ckpt_path``) is returned as it is."""
    if not any(marker in message for marker in _REPORT_MARKERS):
        return message.strip()
    keys: list[str] = []
    class_path = None
    details: list[str] = []
    union_members: list[str] = []
    given = None
    for raw in message.splitlines():
        line = raw.strip()
        member, value = _UNION_MEMBER.match(line), _GIVEN_VALUE.match(line)
        if member and ". Got value: " not in line and member.group(1) not in union_members:
            union_members.append(member.group(1))
        if value and given is None:  # the innermost report comes first; outer ones repeat the whole block
            given = _literal(value.group(1)) if value.group(1) is not None else value.group(2)
        if not line or _NOISE.match(line):
            continue
        match = _PARSER_KEY.match(line)
        if match:
            keys.append(match.group(2))
            line = match.group(3)
        match = _CLASS_PATH.match(line)
        if match:
            class_path = match.group(2)
            keys.append("init_args")
            line = match.group(3)
        line = line.lstrip("- ").strip()
        if line and line not in details:
            details.append(line)
    if not details:
        return message.strip()
    detail = details[-1]
    not_accepted = _NOT_ACCEPTED.match(detail)
    expected = _EXPECTED.match(detail)
    if not_accepted and class_path:
        option = not_accepted.group(1)
        keys.append(option)
        accepted = class_arguments(class_path)
        suggestion = did_you_mean(option, accepted)
        detail = f"{class_path} has no argument {option!r}{suggestion}"
        if accepted and not suggestion:
            detail += f" (its arguments: {', '.join(accepted)})"
    elif expected:
        detail = f"got {expected.group(2)!r}, expected {describe_type(expected.group(1))}"
    elif len(union_members) > 1 and given is not None and detail.startswith("Expected a"):
        detail = f"got {given!r}, expected " + " or ".join(describe_type(m) for m in union_members)
    elif len(details) > 1 and not keys:
        detail = ": ".join(details)
    while keys and keys[-1] == "init_args":
        keys.pop()
    where = ".".join(keys)
    help_hint = f"python train.py {subcommand} --help" if subcommand else "python train.py --help"
    return f"{where + ': ' if where else ''}{detail} (every key: {help_hint}, or add --print_config)"


def config_files(args: list[str]) -> list[str]:
    """The values of ``--config`` / ``-c`` in a command line."""
    files = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            files.append(args[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.partition("=")[2])
    return files


def check_config_files(args: list[str]) -> None:
    """A missing or malformed YAML file named with its problem and position, before jsonargparse reads it
    (it reports YAML syntax errors without the file's name)."""
    for name in config_files(args):
        path = Path(name)
        if not path.is_file():
            raise CommandLineError(f"config file {name} does not exist; check the path (relative to {Path.cwd()})")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise CommandLineError(f"config file {name} is not UTF-8 text ({err}); save it as UTF-8 YAML") from err
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err)
            raise CommandLineError(f"config file {name} is not valid YAML{where}: {problem}; fix the syntax") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise CommandLineError(
                f"config file {name} holds a {type(loaded).__name__}, not a mapping of keys (model:, data:, "
                "trainer:, ...); see configs/ for examples"
            )
