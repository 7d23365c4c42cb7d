"""The stored forms of a teacher layer, one registry: config validation, the dump, the cache reader, the methods'
needs, --online and inspect --verify all read FORMS. Adding a form is one entry here (and, when it has settings of
its own, their keys in `dump.layers`). It lives in core, below the cache package, because the configuration
validates against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class StoredForm:
    """One form a teacher layer can be stored in: where it lives in the file, what its metadata record holds, and how
    it is computed from the layer's output (by the dump, and again by --online and inspect --verify)."""

    group: str  # HDF5 group of its arrays: <group>/<layer>
    keys: tuple[str, ...]  # the settings its record keeps besides "shape"
    settings: Callable[[Any], dict]  # the dump's LayerSpec -> those settings
    compute: Callable[[Any, dict], Any]  # (the layer's float output, its record) -> the stored value, before float16


def _map(t, record: dict):
    from logitcache.core.features import pool_feature

    return pool_feature(t, record["pooled_to"] or 0)


def _attention(t, record: dict):
    from logitcache.core.features import attention_map

    return attention_map(t, record["p"])


def _embedding(t, record: dict):
    from logitcache.core.features import embedding

    return embedding(t)


FORMS: dict[str, StoredForm] = {
    "map": StoredForm("features", ("pooled_to",), lambda spec: {"pooled_to": spec.pool or None}, _map),
    "attention": StoredForm("attention", ("p",), lambda spec: {"p": spec.p}, _attention),
    "embedding": StoredForm("embedding", (), lambda spec: {}, _embedding),
}
