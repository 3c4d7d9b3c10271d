"""The canonical JSON of a run config: the text its hash is taken of and the store keeps.

``canonical_json`` is the definition: ``json.dumps`` with sorted keys, no spaces
and no NaN or Infinity, so key order and number spelling (0.1, 1e-1) do not
change it. ``fast_canonical_json`` gives the same text (a test checks it on
arbitrary configs) for the million configs of a big grid: ``json.dumps`` builds
an encoder object per call, which costs about as much as the encoding itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

try:
    from _json import make_encoder as _c_make_encoder
except ImportError:  # an interpreter without json's C accelerator
    _c_make_encoder = None

_SEPARATORS = (",", ":")


def canonical_json(config: Mapping[str, Any]) -> str:
    """``config`` as JSON with sorted keys and no spaces; ValueError on NaN or Infinity."""
    return json.dumps(config, sort_keys=True, separators=_SEPARATORS, allow_nan=False)


def _fast_encoder() -> Callable[[Mapping[str, Any]], str]:
    encoder = json.JSONEncoder(sort_keys=True, separators=_SEPARATORS, allow_nan=False)
    if _c_make_encoder is None:
        return encoder.encode
    # What JSONEncoder.iterencode builds on each call, built once; no check for
    # circular references (a config is plain data), hence no markers dict.
    encode = _c_make_encoder(
        None,  # markers
        encoder.default,
        json.encoder.encode_basestring_ascii,
        None,  # indent
        _SEPARATORS[1],
        _SEPARATORS[0],
        True,  # sort_keys
        False,  # skipkeys
        False,  # allow_nan
    )

    def fast(config: Mapping[str, Any]) -> str:
        return "".join(encode(config, 0))

    return fast


#: ``canonical_json``, faster: the same text for a dict of plain JSON values.
fast_canonical_json: Callable[[Mapping[str, Any]], str] = _fast_encoder()
