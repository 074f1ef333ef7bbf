"""Refuse a checkpoint whose architecture does not match the config, naming every difference."""

from __future__ import annotations

import json


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_compatible(saved_meta: dict, current_meta: dict, *, source: str = "checkpoint") -> None:
    """Raises ValueError listing each dotted key whose saved value differs from the config's.

    `current_meta` goes through a JSON round trip first, as the saved one did (tuples -> lists).
    A key present on one side only is a mismatch too.
    """
    saved = _flatten(saved_meta)
    current = _flatten(json.loads(json.dumps(current_meta)))
    diffs = [
        f"{k}: saved {saved.get(k, _ABSENT)!r} vs config {current.get(k, _ABSENT)!r}"
        for k in sorted(saved.keys() | current.keys())
        if saved.get(k, _ABSENT) != current.get(k, _ABSENT)
    ]
    if diffs:
        raise ValueError(f"{source} does not match the config: " + "; ".join(diffs))
