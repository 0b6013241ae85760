"""Checkpoint ``meta`` as data: a small schema that types, bounds and allow-lists what a weights file may say.

A ctsynth checkpoint carries ``meta`` beside its weights (the network's class and constructor arguments, the
noise schedule, grid sizes). ``torch.load(weights_only=True)`` keeps unpickling from running code, but the
values themselves come from whoever wrote the file: before any of them builds a network, sizes a buffer or
reaches a configuration, :func:`validate_meta` checks each against a :class:`MetaField` and refuses anything
else with an error naming the file and the key.

Strings that pass are plain words (:data:`SAFE_STRING`): no ``$`` (MONAI's expression prefix), ``@`` / ``%``
(reference and macro), ``#`` / ``::`` (id separators), quotes, spaces or path separators.

A schema is a mapping ``key -> MetaField`` (or the same as JSON: ``{"key": {"type": "int", "min": 1}}``).
``network`` rules (:func:`validate_network_meta`) add an allow-list of ``network_target`` classes and check
``network_config`` against the target's constructor signature.

Example::

    schema = {"features": MetaField("ints", min=1, max=1024, max_len=16)}
    meta = validate_meta({"features": [32, 32]}, schema, "refiner.pt", required=("features",))
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["MetaField", "MetaError", "SAFE_STRING", "parse_schema", "validate_meta", "validate_network_meta",
           "validate_checkpoint_meta", "check_plain_value", "CheckpointNetwork"]

#: a string that no configuration parser treats specially: letters, digits, ``_ . -`` and ``+``
SAFE_STRING = re.compile(r"^[A-Za-z0-9_.+\-]{0,128}$")
_TYPES = ("int", "float", "bool", "str", "ints", "floats", "plain")
#: limits of a ``plain`` value (nested lists/dicts of scalars)
_PLAIN_DEPTH, _PLAIN_ITEMS = 4, 256


class MetaError(ValueError):
    """A checkpoint's meta holds a value its schema does not allow; the message names the file and the key."""


@dataclass(frozen=True)
class MetaField:
    """What one meta key may hold.

    Args:
        type: ``int``, ``float`` (finite), ``bool``, ``str`` (:data:`SAFE_STRING`, or one of ``choices``),
            ``ints`` / ``floats`` (lists of them), or ``plain`` (nested lists and dicts of finite numbers, booleans,
            ``None`` and safe strings).
        min, max: inclusive bounds of a number, or of every number in a list or plain value.
        choices: the values a ``str`` (or number) may take.
        len: the exact length of a list; ``max_len``: its largest length.
        nullable: ``None`` is allowed.
    """

    type: str
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None
    len: int | None = None
    max_len: int | None = None
    nullable: bool = False

    def __post_init__(self) -> None:
        if self.type not in _TYPES:
            raise ValueError(f"MetaField type must be one of {_TYPES}, got {self.type!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], key: str = "field") -> MetaField:
        unknown = set(data) - {"type", "min", "max", "choices", "len", "max_len", "nullable"}
        if unknown or "type" not in data:
            raise ValueError(f"schema entry {key!r}: needs 'type' and may have min/max/choices/len/max_len/nullable; "
                             f"got {sorted(data)}")
        choices = data.get("choices")
        return cls(**{**data, "choices": tuple(choices) if choices is not None else None})


def parse_schema(data: Mapping[str, Any]) -> dict[str, MetaField]:
    """A schema from its JSON form (``{"key": {"type": ..., ...}}``); :class:`MetaField` values pass unchanged."""
    return {k: v if isinstance(v, MetaField) else MetaField.from_dict(v, k) for k, v in data.items()}


def _fail(source: str, key: str, why: str) -> MetaError:
    return MetaError(f"{source}: meta key {key!r} {why}; this weights file was not written by ctsynth's training or "
                     "was edited. Use the file the bundle's training wrote, or retrain")


def _number(value: Any, field: MetaField, source: str, key: str, integer: bool) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(source, key, f"must be {'an integer' if integer else 'a number'}, got {type(value).__name__}")
    if integer and isinstance(value, float):
        if not value.is_integer():
            raise _fail(source, key, f"must be an integer, got {value!r}")
        value = int(value)
    if not math.isfinite(value):
        raise _fail(source, key, f"must be finite, got {value!r}")
    if field.min is not None and value < field.min or field.max is not None and value > field.max:
        raise _fail(source, key, f"is {value!r}, outside [{field.min}, {field.max}]")
    if field.choices is not None and value not in field.choices:
        raise _fail(source, key, f"is {value!r}, not one of {list(field.choices)}")
    return value


def check_plain_value(value: Any, source: str, key: str, lo: float | None = None, hi: float | None = None,
                      depth: int = 0) -> Any:
    """``value`` if it is plain data: nested lists / dicts (safe-string keys, none starting with ``_``, so no
    ``_target_``) of finite numbers within
    ``[lo, hi]``, booleans, ``None`` and :data:`SAFE_STRING` strings, at most 4 levels and 256 items a level.

    Raises:
        MetaError: naming ``source`` and ``key``.
    """
    if depth > _PLAIN_DEPTH:
        raise _fail(source, key, f"nests deeper than {_PLAIN_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return _number(value, MetaField("float", lo, hi), source, key, integer=False)
    if isinstance(value, str):
        if not SAFE_STRING.match(value):
            raise _fail(source, key, f"holds the string {value[:60]!r}; only letters, digits and '_.+-' are allowed")
        return value
    if isinstance(value, (list, tuple)):
        if len(value) > _PLAIN_ITEMS:
            raise _fail(source, key, f"has {len(value)} items (at most {_PLAIN_ITEMS})")
        return [check_plain_value(v, source, key, lo, hi, depth + 1) for v in value]
    if isinstance(value, Mapping):
        if len(value) > _PLAIN_ITEMS:
            raise _fail(source, key, f"has {len(value)} entries (at most {_PLAIN_ITEMS})")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or not SAFE_STRING.match(k) or not k or k.startswith("_"):
                raise _fail(source, key, f"has the entry name {str(k)[:60]!r}; only names of letters, digits and "
                                         "'_.+-' not starting with '_' (no '_target_')")
            out[k] = check_plain_value(v, source, f"{key}.{k}", lo, hi, depth + 1)
        return out
    raise _fail(source, key, f"holds a {type(value).__name__}; only numbers, booleans, words, lists and dicts")


def _check(value: Any, field: MetaField, source: str, key: str) -> Any:
    if value is None:
        if field.nullable:
            return None
        raise _fail(source, key, "must not be empty (None)")
    kind = field.type
    if kind in ("int", "float"):
        return _number(value, field, source, key, integer=kind == "int")
    if kind == "bool":
        if not isinstance(value, bool):
            raise _fail(source, key, f"must be true or false, got {value!r}")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise _fail(source, key, f"must be a string, got {type(value).__name__}")
        if field.choices is not None:
            if value not in field.choices:
                raise _fail(source, key, f"is {value[:60]!r}, not one of {list(field.choices)}")
        elif not SAFE_STRING.match(value):
            raise _fail(source, key, f"holds {value[:60]!r}; only letters, digits and '_.+-' are allowed")
        return value
    if kind in ("ints", "floats"):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise _fail(source, key, f"must be a list of numbers, got {type(value).__name__}")
        n = len(value)
        if field.len is not None and n != field.len or field.max_len is not None and n > field.max_len or n == 0:
            want = field.len if field.len is not None else f"1 to {field.max_len or _PLAIN_ITEMS}"
            raise _fail(source, key, f"has {n} values, expected {want}")
        if n > _PLAIN_ITEMS:
            raise _fail(source, key, f"has {n} values (at most {_PLAIN_ITEMS})")
        item = MetaField("int" if kind == "ints" else "float", field.min, field.max, field.choices)
        return [_number(v, item, source, f"{key}[{i}]", integer=kind == "ints") for i, v in enumerate(value)]
    return check_plain_value(value, source, key, field.min, field.max)


def validate_meta(meta: Any, schema: Mapping[str, MetaField | Mapping[str, Any]], source: str | Path,
                  required: Sequence[str] = ()) -> dict[str, Any]:
    """The checked copy of ``meta``: every key of ``schema`` that ``meta`` holds, converted (``ints`` as lists of
    ``int``); keys the schema does not name are left out, so nothing unchecked travels on.

    Raises:
        MetaError: ``meta`` is not a dict, lacks a ``required`` key, or a value breaks its field (names ``source``
            and the key).
    """
    source = str(source)
    if not isinstance(meta, Mapping):
        raise MetaError(f"{source}: its meta is a {type(meta).__name__}, not a dict; use a checkpoint written by "
                        "ctsynth's training")
    fields = parse_schema(schema)
    missing = [k for k in required if k not in meta]
    if missing:
        raise MetaError(f"{source}: its meta lacks {missing}; use a checkpoint written by the matching training")
    return {k: _check(meta[k], f, source, k) for k, f in fields.items() if k in meta}


class CheckpointNetwork(NamedTuple):
    """The network a checkpoint describes, checked: its allowed ``target`` name, the ``cls`` it names and the
    constructor ``args``."""

    target: str
    cls: type
    args: dict[str, Any]


def validate_network_meta(meta: Mapping[str, Any], targets: Mapping[str, type], source: str | Path,
                          config_fields: Mapping[str, MetaField | Mapping[str, Any]] | None = None,
                          int_max: float = 8192.0) -> CheckpointNetwork | None:
    """The network a checkpoint's ``network_target`` / ``network_config`` describe, or ``None`` when it
    describes none (a bare state dict: the caller's own network is used).

    Args:
        targets: allowed ``network_target`` names -> their classes (the bundle's own networks).
        config_fields: rules for named constructor arguments; the others must be plain values
            (:func:`check_plain_value`) with every number within ``[-int_max, int_max]``.

    Raises:
        MetaError: a target outside ``targets``, an argument the class does not take, or a value breaking its rule.
    """
    source = str(source)
    target, config = meta.get("network_target"), meta.get("network_config")
    if not target and not config:
        return None
    if not isinstance(target, str) or target not in targets:
        allowed = sorted(targets)
        raise MetaError(f"{source}: meta key 'network_target' is {str(target)[:80]!r}, not one of this bundle's "
                        f"networks {allowed}; use a checkpoint written by this bundle's training")
    if not isinstance(config, Mapping):
        raise MetaError(f"{source}: meta key 'network_config' must be a dict of {target}'s arguments, got "
                        f"{type(config).__name__}; use a checkpoint written by this bundle's training")
    cls = targets[target]
    params = inspect.signature(cls).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    fields = parse_schema(config_fields or {})
    out = {}
    for k, v in config.items():
        key = f"network_config.{k}"
        if not isinstance(k, str) or not (k in params or takes_any) or k.startswith("_"):
            raise MetaError(f"{source}: meta key {key!r}: {target} takes no argument {str(k)[:60]!r}; use a checkpoint "
                            "written by this bundle's training")
        out[k] = _check(v, fields[k], source, key) if k in fields else check_plain_value(v, source, key, -int_max,
                                                                                           int_max)
    return CheckpointNetwork(target, cls, out)


def validate_checkpoint_meta(meta: Any, rules: Mapping[str, Any], source: str | Path,
                             targets: Mapping[str, type]) -> tuple[dict[str, Any], CheckpointNetwork | None]:
    """A checkpoint's meta checked against one entry of a bundle's ``configs/checkpoints.json``: (the checked
    ``fields``, the :class:`CheckpointNetwork` or ``None``).

    ``rules`` holds ``required`` keys (a file lacking one is not ``kind``, the words for what such a file is),
    ``fields`` (:class:`MetaField` per key), ``network_targets`` (the names in ``targets``), ``network_config``
    (rules per constructor argument) and ``network_int_max``.

    Raises:
        MetaError: naming ``source`` and the key.
    """
    if not isinstance(meta, Mapping):
        raise MetaError(f"{source}: its meta is a {type(meta).__name__}, not a dict; use a checkpoint written by "
                        "ctsynth's training")
    missing = [k for k in rules.get("required", ()) if k not in meta]
    if missing:
        raise MetaError(f"{source}: not {rules.get('kind', 'a checkpoint of this bundle')} (its meta has no "
                        f"{missing[0]}); pass the file written by the bundle's training")
    checked = validate_meta(meta, rules.get("fields", {}), source)
    network = validate_network_meta(meta, targets, source, rules.get("network_config"),
                                    float(rules.get("network_int_max", 8192)))
    return checked, network
