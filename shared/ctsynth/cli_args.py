"""Checks a ``ctsynth`` command line against the command's signature before anything runs.

python-fire runs a command first and complains about a misspelt option afterwards, and passes ``false`` to a
boolean as a (truthy) string. :func:`check_command_line` resolves the command, then refuses, naming the option
and the closest valid one:

* an unknown option (``--spacng``), a command that does not exist, an argument too many, a missing required one;
* an option without its value (``--out`` last);
* a boolean that is not ``true/false/yes/no/1/0`` (any case); a bare ``--flag`` means true, ``--noflag`` false;
* a number option whose value is not a finite number.

It returns the command line fire should run, with every option as ``--name=value``, booleans as ``True`` /
``False`` and string options quoted, so that fire neither re-types a string (``--series-uid 1.2`` stays the
string ``"1.2"``) nor reads a value as anything but data.
"""

from __future__ import annotations

import difflib
import inspect
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["UsageError", "check_command_line", "command_name", "runs_a_command", "parse_bool", "BOOL_WORDS"]

#: what a boolean option accepts (any case)
BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


class UsageError(ValueError):
    """The command line is wrong (exit status 2); the message names the option and the fix."""


def parse_bool(value: Any, name: str) -> bool:
    """``True`` / ``False`` from a boolean or one of :data:`BOOL_WORDS`.

    Raises:
        UsageError: anything else, naming ``--name``.
    """
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word not in BOOL_WORDS:
        raise UsageError(f"--{name} takes true/false (or yes/no, 1/0), got {value!r}")
    return BOOL_WORDS[word]


def _closest(name: str, options: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"; did you mean {match[0]}?" if match else ""


def _commands(group: Any) -> dict[str, Any]:
    return {n: getattr(group, n) for n in dir(group) if not n.startswith("_")}


def _walk(root: Any, argv: Sequence[str]) -> tuple[list[str], Callable[..., Any] | None, int, str | None]:
    """(command path, the command's function or None for a bare group / help, index of its first argument, the
    token that names no command of the group reached, or None)."""
    obj, path, i = root, [], 0
    while i < len(argv) and not argv[i].startswith("-"):
        member = _commands(obj).get(argv[i].replace("-", "_"))
        if member is None:
            return path, None, i, argv[i]
        path.append(argv[i])
        i += 1
        if inspect.ismethod(member) or inspect.isfunction(member):
            return path, member, i, None
        obj = member
    return path, None, i, None


def _resolve(root: Any, argv: Sequence[str]) -> tuple[list[str], Callable[..., Any] | None, int]:
    """:func:`_walk`, refusing a token that names no command (with the closest one)."""
    path, func, start, unknown = _walk(root, argv)
    if unknown is not None:
        group = root
        for tok in path:
            group = _commands(group)[tok.replace("-", "_")]
        choices = sorted(m.replace("_", "-") for m in _commands(group))
        raise UsageError(f"'{' '.join(['ctsynth', *path])}' has no command {unknown!r}"
                         f"{_closest(unknown.replace('_', '-'), choices)} (commands: {', '.join(choices)})")
    return path, func, start


def _kind(annotation: Any) -> str:
    """``bool``, ``int``, ``float``, ``str`` (optional or not), or ``any`` (fire parses it: lists, numbers...)."""
    members = typing.get_args(annotation) or (annotation,)
    args = [a for a in members if a is not type(None)]
    if len(args) != 1:
        return "any"
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(args[0], "any")


def _typed(value: str, kind: str, name: str) -> str:
    """The value as fire should receive it (``--name=<this>``)."""
    if kind == "bool":
        return str(parse_bool(value, name))
    if kind in ("int", "float"):
        value = value[:-1] if value.endswith(",") and value.count(",") == 1 else value  # "--spacing 2" joined as "2,"
        try:
            number = int(value) if kind == "int" else float(value)
        except ValueError:
            raise UsageError(f"--{name} takes {'an integer' if kind == 'int' else 'a number'}, got {value!r}") from None
        if not math.isfinite(number):
            raise UsageError(f"--{name} must be a finite number, got {value!r}")
        return repr(number)
    if kind == "str":
        return repr(value)  # fire reads a quoted literal as that exact string
    return value


def runs_a_command(root: Any, argv: Sequence[str]) -> bool:
    """Whether ``argv`` runs a command (rather than asking for help or naming a command group); a command line
    naming no command counts as one (check_command_line refuses it)."""
    if any(a in ("--help", "-h") for a in argv):
        return False
    _, func, _, unknown = _walk(root, argv)
    return func is not None or unknown is not None


def command_name(root: Any, argv: Sequence[str]) -> str:
    """``ctsynth <command path>`` of ``argv`` as far as it names commands (for messages)."""
    return " ".join(["ctsynth", *_walk(root, argv)[0]])


def _check_limits(value: str, kind: str, name: str, limits: Mapping[str, tuple[float, float]]) -> None:
    """Refuses a number of option ``name`` (every number of a comma-separated list) outside ``limits[name]``."""
    if name.replace("-", "_") not in limits or kind in ("bool", "str"):
        return
    lo, hi = limits[name.replace("-", "_")]
    for item in (v for v in value.split(",") if v.strip()):
        try:
            number = float(item)
        except ValueError:
            continue  # a word (e.g. --volume none): the command checks it
        if not math.isfinite(number) or not lo <= number <= hi:
            raise UsageError(f"--{name} must be between {lo:g} and {hi:g}, got {item.strip()}")


def check_command_line(root: Any, argv: Sequence[str],
                       limits: Mapping[str, tuple[float, float]] | None = None) -> list[str]:
    """The command line for fire, checked against the command's signature (see the module docstring); every
    number given to an option named in ``limits`` (name -> (lowest, highest)) must lie within them.

    ``--help`` / ``-h`` anywhere, a bare command group, or ``--`` (fire's own flags follow) is passed on unchecked.

    Raises:
        UsageError: naming what is wrong and the closest valid option or command.
    """
    argv = list(argv)
    if any(a in ("--help", "-h") for a in argv):
        return argv
    path, func, start = _resolve(root, argv)
    if func is None:
        return argv
    sig = inspect.signature(func)
    hints = typing.get_type_hints(func)
    params = {n: p for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    kinds = {n: _kind(hints.get(n, Any)) for n in params}
    varargs = next((p for p in sig.parameters.values() if p.kind is p.VAR_POSITIONAL), None)
    options = sorted(f"--{n.replace('_', '-')}" for n in params)

    out, positional, given, after_bare_flag = list(argv[:start]), [], set(), {}
    j = start
    while j < len(argv):
        tok = argv[j]
        if tok == "--":
            out += argv[j:]
            break
        if not tok.startswith("--") or tok == "-":
            positional.append(tok)
            j += 1
            continue
        key, has_value, value = tok[2:].partition("=")
        name = key.replace("-", "_")
        negated = name not in params and name.startswith("no") and kinds.get(name[2:]) == "bool"
        name = name[2:] if negated else name
        if name not in params:
            raise UsageError(f"unknown option --{key}{_closest('--' + key.replace('_', '-'), options)} "
                             f"(options: {' '.join(options)})")
        if name in given:
            raise UsageError(f"--{key} is given twice; give it once")
        given.add(name)
        if kinds[name] == "bool":
            if has_value:
                flag = parse_bool(value, key)
            elif j + 1 < len(argv) and argv[j + 1].lower() in BOOL_WORDS:
                flag = parse_bool(argv[j + 1], key)
                j += 1
            else:
                flag = True
                if j + 1 < len(argv) and not argv[j + 1].startswith("-"):
                    after_bare_flag[argv[j + 1]] = key
            out.append(f"--{name}={not flag if negated else flag}")
            j += 1
            continue
        if not has_value:
            if j + 1 >= len(argv) or argv[j + 1].startswith("--"):
                raise UsageError(f"--{key} needs a value")
            value = argv[j + 1]
            j += 1
        typed = _typed(value, kinds[name], key)
        _check_limits(value, kinds[name], key, limits or {})
        out.append(f"--{name}={typed}")
        j += 1

    # only required arguments are positional: an option is always named
    slots = [n for n, p in params.items()
             if p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty and n not in given]
    if len(positional) > len(slots) and varargs is None:
        extra = positional[len(slots)]
        if extra in after_bare_flag:
            raise UsageError(f"--{after_bare_flag[extra]} takes true/false (or yes/no, 1/0), got {extra!r}")
        raise UsageError(f"unexpected argument {extra!r}; options are written --name value "
                         f"(options: {' '.join(options)})")
    for n, tok in zip(slots, positional):
        given.add(n)
        typed = _typed(tok, kinds[n], n)
        _check_limits(tok, kinds[n], n, limits or {})
        out.append(typed)
    rest_kind = _kind(hints.get(varargs.name, Any)) if varargs is not None else "any"
    out += [_typed(tok, rest_kind, varargs.name) for tok in positional[len(slots):]] if varargs is not None else []
    missing = [n for n, p in params.items() if p.default is p.empty and n not in given]
    if missing:
        raise UsageError(f"missing {', '.join(m.upper() for m in missing)}: give "
                         f"{' '.join('--' + m.replace('_', '-') + ' VALUE' for m in missing)}")
    return out
