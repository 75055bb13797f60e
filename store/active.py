"""Which Milvus collection serves a collection name, and the model it was built with.

`RAG_COLLECTION` names a knowledge base. Until it is tuned, the collection of that name holds
its chunks, as it always did. `rag tune` writes a new collection (`<name>__ft_<model hash>`)
beside it and then points the Milvus alias `<name>__active` at it; `rag tune --rollback`
points the alias back at the collection it replaced. Altering an alias is one atomic call,
and every reader resolves the alias to a real collection first, so a process keeps the
collection and the model it opened together until it resolves again.

Why an alias of its own rather than `<name>` itself: an alias can't share a name with a
collection, and collections made before this feature are called `<name>`; renaming them
under a running server would leave a moment with no collection at all.

A tuned collection records its model in its properties (`rag.model`: the model's name,
its base model, `tuned_from`, the collection it replaced, and the training data), and what
tuning measured in `rag.tune`. Properties, not the description: Milvus Lite keeps no
collection description at all, and a description can't be changed after creation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from errors import StoreError
from settings import Settings, import_pymilvus_safely

if TYPE_CHECKING:
    from pymilvus import MilvusClient

ACTIVE_SUFFIX = "__active"
TUNED_INFIX = "__ft_"
MODEL_PROPERTY = "rag.model"
TUNE_PROPERTY = "rag.tune"


def active_alias(collection: str) -> str:
    """The alias that points at the collection serving `collection`."""
    return f"{collection}{ACTIVE_SUFFIX}"


def tuned_collection_name(collection: str, model_name: str) -> str:
    """The collection holding `collection`'s chunks embedded with a tuned model."""
    digest = model_name.rsplit("-", 1)[-1]
    return f"{collection}{TUNED_INFIX}{digest}"


def _alias_exists(client: MilvusClient, alias: str) -> bool:
    # Listed first: pymilvus logs a traceback for every failed call, describe_alias included.
    return alias in (client.list_aliases().get("aliases") or [])


def resolve(client: MilvusClient, collection: str) -> str:
    """The collection that currently serves `collection` (itself when never tuned)."""
    alias = active_alias(collection)
    if not _alias_exists(client, alias):
        return collection
    return str(client.describe_alias(alias)["collection_name"])


def point_to(client: MilvusClient, collection: str, target: str) -> None:
    """Make `target` serve `collection`: one atomic alias change."""
    alias = active_alias(collection)
    if _alias_exists(client, alias):
        client.alter_alias(target, alias)
    else:
        client.create_alias(target, alias)


@dataclass
class CollectionRecord:
    """What a collection says about itself: its model and, if tuned, how."""

    name: str
    embedding_model: str | None = None
    base_model: str | None = None
    tuned_from: str | None = None
    description: dict[str, Any] = field(default_factory=dict)
    tune: dict[str, Any] = field(default_factory=dict)

    @property
    def tuned(self) -> bool:
        """Whether the collection was built with a tuned model."""
        return self.base_model is not None


def _json_object(text: str | None) -> dict[str, Any]:
    if not text or not text.startswith("{"):
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def read_record(client: MilvusClient, name: str) -> CollectionRecord:
    """The record of an existing collection (empty fields for one that has none)."""
    info = client.describe_collection(name)
    properties = info.get("properties") or {}
    # The description, where a Milvus server kept it, then what `rag tune` recorded.
    described = {**_json_object(info.get("description")), **_json_object(properties.get(MODEL_PROPERTY))}
    return CollectionRecord(
        name=name,
        embedding_model=described.get("embedding_model"),
        base_model=described.get("base_model"),
        tuned_from=described.get("tuned_from"),
        description=described,
        tune=_json_object(properties.get(TUNE_PROPERTY)),
    )


def write_model(client: MilvusClient, name: str, model: dict[str, Any]) -> None:
    """Record on the collection which model built it (`embedding_model`, `base_model`, ...)."""
    client.alter_collection_properties(name, properties={MODEL_PROPERTY: json.dumps(model)})


def write_tune_figures(client: MilvusClient, name: str, figures: dict[str, Any]) -> None:
    """Record what tuning measured on the collection itself."""
    client.alter_collection_properties(name, properties={TUNE_PROPERTY: json.dumps(figures)})


def tuned_collections(client: MilvusClient, collection: str) -> list[str]:
    """Every tuned collection of `collection`, active or not."""
    prefix = f"{collection}{TUNED_INFIX}"
    return sorted(name for name in client.list_collections() if name.startswith(prefix))


def active_collection(settings: Settings) -> tuple[str, CollectionRecord | None]:
    """The collection serving settings.collection now, and its record (None: not created yet).

    Opens a client of its own for the two calls: the store opens the collection this names.
    """
    import_pymilvus_safely()
    from pymilvus import MilvusClient

    from store.milvus import connection_args, describe_failure

    try:
        client = MilvusClient(**connection_args(settings))
    except Exception as exc:
        raise StoreError(describe_failure(settings, exc)) from exc
    try:
        name = resolve(client, settings.collection)
        record = read_record(client, name) if client.has_collection(name) else None
    except Exception as exc:
        raise StoreError(describe_failure(settings, exc)) from exc
    finally:
        client.close()
    return name, record


def describe_active(client: MilvusClient, collection: str, serving: str) -> dict[str, Any]:
    """For `rag stats`: which collection serves `collection`, its model's base, its figures."""
    record = read_record(client, serving) if client.has_collection(serving) else CollectionRecord(serving)
    return {
        "collection": collection,
        "active_collection": serving,
        "base_model": record.base_model or record.embedding_model,
        "tuned_from": record.tuned_from,
        "tune": record.tune,
    }
