"""Composition of the stages for the CLI and the server: settings in, a ready service out."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool

from chains.rag import AnswerPolicy, build_chat_chain, build_rag_chain
from chains.retrieval import MilvusRetriever, make_retriever, per_request_settings
from errors import StoreError
from loaders.markdown import Chunker, token_counter
from settings import DEFAULT_KB, Settings
from store.active import CollectionRecord, active_collection, read_record, resolve
from store.embeddings import PymilvusEmbeddings, load_tokenizer, make_embeddings
from store.milvus import RagStore, make_store

log = logging.getLogger(__name__)

# How often an open service asks which collection serves RAG_COLLECTION (one alias lookup),
# so that a `rag tune` or `rag tune --rollback` run elsewhere reaches a running server.
ACTIVE_RECHECK_S = 15.0


@dataclass
class RagService:
    """Settings, the embedding model, the store (opened on demand), retriever, LLM and chain."""

    settings: Settings
    embeddings: PymilvusEmbeddings
    llm: Any = None
    _store: RagStore | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _checked_at: float = 0.0
    # The model RAG_EMBEDDING names; `embeddings` is the one the serving collection was built with.
    _base_embeddings: PymilvusEmbeddings | None = None
    # Stores replaced by a switch: searches begun on them may still run; closed with the service.
    _retired: list[RagStore] = field(default_factory=list)
    retriever: MilvusRetriever = field(init=False)
    # The same retriever with k, mode and filters settable per request (LangServe config).
    configurable_retriever: Runnable = field(init=False)
    chain: Runnable = field(init=False)
    # The same chain for chat UIs: the answer as text with the sources under it.
    chat_chain: Runnable = field(init=False)

    def __post_init__(self) -> None:
        self._base_embeddings = self.embeddings
        self.retriever = make_retriever(
            self.get_store, self.settings.top_k, self.settings.search, self.settings.max_k
        )
        self.configurable_retriever = per_request_settings(self.retriever)
        from chains.llm import describe_llm_error

        self.chain = build_rag_chain(
            self.configurable_retriever,
            self.llm,
            max_question_chars=self.settings.max_question_chars,
            policy=AnswerPolicy.from_settings(self.settings),
            history_messages=self.settings.history_messages,
            describe_error=partial(describe_llm_error, where=self.settings.deepseek_base_url),
        )
        self.chat_chain = build_chat_chain(self.chain)

    def get_store(self) -> RagStore:
        """The open store of the collection serving RAG_COLLECTION, with the model it was built
        with; opens it (again) if it isn't, raising StoreError if Milvus is down."""
        store = self._store
        if store is not None and time.monotonic() - self._checked_at < ACTIVE_RECHECK_S:
            return store
        with self._lock:
            if self._store is None:
                name, record = active_collection(self.settings)
                self._checked_at = time.monotonic()
                self._store = self._open(name, record)
            elif time.monotonic() - self._checked_at >= ACTIVE_RECHECK_S:
                self._follow_switch(self._store)
            return self._store

    @property
    def base_embeddings(self) -> PymilvusEmbeddings:
        """The model RAG_EMBEDDING names, whichever one the serving collection was built with."""
        return self._base_embeddings or self.embeddings

    def _open(self, name: str, record: CollectionRecord | None) -> RagStore:
        embeddings = self.embeddings_for(record)
        store = make_store(self.settings.model_copy(update={"collection": name}), embeddings)
        if embeddings is not self.embeddings:
            self.embeddings.close()
            self.embeddings = embeddings
        return store

    def embeddings_for(self, record: CollectionRecord | None) -> PymilvusEmbeddings:
        """The model a collection was built with: RAG_EMBEDDING's, or the tuned one it names."""
        if record is None or not record.tuned or record.embedding_model is None:
            return self.base_embeddings
        if record.embedding_model == self.embeddings.name:
            return self.embeddings
        from store.tuning import missing_model_error, tuned_model_dir

        cache_dir = Path(self.settings.cache_dir).expanduser()
        model_dir = tuned_model_dir(cache_dir, str(record.embedding_model))
        if model_dir is None:
            raise missing_model_error(record.name, str(record.embedding_model), cache_dir)
        return make_embeddings(self.settings.model_copy(update={"embedding": str(model_dir)}))

    def _follow_switch(self, current: RagStore) -> None:
        """Move to the collection (and model) that now serves RAG_COLLECTION, if it changed."""
        self._checked_at = time.monotonic()
        try:
            name = resolve(current.client, self.settings.collection)
            if name == current.collection:
                return
            record = read_record(current.client, name)
            store = self._open(name, record)
        except Exception as exc:  # keep serving what is open; the next check tries again
            log.warning("could not follow the switch of %s: %s", self.settings.collection, exc)
            return
        log.info("%s is now served by %s (%s)", self.settings.collection, name, store.embeddings.name)
        self._retired.append(current)
        self._store = store

    def tools(self) -> list[BaseTool]:
        """search_docs and ask_docs over this service, for an agent in this process."""
        from chains.tools import rag_tools

        return rag_tools(self.configurable_retriever, self.chain)

    def chunker(self) -> Chunker:
        """The chunker matched to the embedding model's tokenizer."""
        tokenizer = load_tokenizer(self.embeddings.model_dir)
        return Chunker(token_counter(tokenizer), self.settings.chunk_tokens)

    def health(self) -> dict[str, Any]:
        """Whether Milvus and the collection are reachable, and how much is stored."""
        report: dict[str, Any] = {
            "milvus": False,
            "collection": False,
            "chunks": 0,
            "milvus_uri": self.settings.milvus_uri,
            "collection_name": self.settings.collection,
            "llm_configured": self.settings.llm_configured,
            "embedding_model": self.embeddings.name,
        }
        try:
            store = self.get_store()
            report["collection"] = store.exists()
            report["milvus"] = True
            report["chunks"] = store.count()
        except StoreError as exc:
            report["error"] = str(exc)
        except Exception as exc:  # the connection broke after opening: reopen next time
            report["error"] = f"Milvus stopped answering: {exc}"
            self.close()
        return report

    def close(self) -> None:
        """Close the store's connection and stop the query-embedding worker."""
        self.embeddings.close()
        with self._lock:
            for retired in self._retired:
                retired.embeddings.close()
                retired.client.close()  # not its Lite server: the open store shares it
            self._retired.clear()
            if self._store is not None:
                self._store.close()
                self._store = None


def open_service(
    settings: Settings, llm: Any = "auto", embeddings: PymilvusEmbeddings | None = None
) -> RagService:
    """A service for these settings; `llm="auto"` builds DeepSeek from settings.

    `embeddings`: a model another service already holds (one model per process, however
    many knowledge bases), else the one the settings name.
    """
    if llm == "auto":
        from chains.llm import make_llm  # the OpenAI client costs ~2 s to import

        llm = make_llm(settings)
    return RagService(
        settings=settings,
        embeddings=embeddings or make_embeddings(settings),
        llm=llm,
    )


@dataclass
class TuneReport:
    """What `rag tune` did and measured."""

    collection: str
    previous: str
    built: str
    model: str
    model_dir: str
    switched: bool
    reason: str
    before: dict[str, dict[str, Any]]
    after: dict[str, dict[str, Any]]
    data: dict[str, Any]
    seconds: dict[str, float]
    peak_rss_mb: float
    search: str

    def as_dict(self) -> dict[str, Any]:
        """The JSON summary."""
        from dataclasses import asdict

        return asdict(self)

    def table(self) -> str:
        """Before and after, one row per question set (markdown)."""
        lines = [
            f"| questions ({self.search}) | n | hit@1 | hit@3 | mrr@10 |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, before in self.before.items():
            after = self.after.get(name, {})
            cells = [
                f"{before[m]:.3f} → {after[m]:.3f}" if m in after else f"{before[m]:.3f}"
                for m in ("hit@1", "hit@3", "mrr@10")
            ]
            lines.append(f"| {name} | {before['questions']} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def summary(self) -> str:
        """A few lines for the terminal."""
        verdict = (
            f"switched: {self.collection} is now served by {self.built} ({self.model})"
            if self.switched
            else f"not switched ({self.reason}): {self.collection} stays on {self.previous}"
        )
        times = ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items())
        return f"{self.table()}\n\n{verdict}\n{times}; peak memory {self.peak_rss_mb:.0f} MiB"


def tune_collection(
    settings: Settings,
    *,
    eval_file: str | None = None,
    force: bool = False,
    config: Any = None,
    progress: bool = True,
    question_writer: Any = None,
) -> TuneReport:
    """Fine-tune the embedding model on what RAG_COLLECTION holds, build a new collection with
    it beside the serving one, measure both, and switch only if the new one is not worse.

    `question_writer(chunks) -> {chunk id: [questions]}` adds generated questions (doc2query).
    Interrupted at any point before the switch, the new collection is dropped and the old
    one keeps serving.
    """
    import resource
    import shutil
    import tempfile

    from chains.evaluation import EvalRow, evaluate, load_rows
    from chains.retrieval import make_retriever
    from errors import InputError
    from store import tuning
    from store.active import (
        point_to,
        tuned_collection_name,
        tuned_collections,
        write_model,
        write_tune_figures,
    )

    config = config or tuning.TuneConfig()
    eval_rows = load_rows(eval_file) if eval_file else []
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    service = open_service(settings, llm=None)
    built: RagStore | None = None
    switched = False
    try:
        old = service.get_store()
        if not old.exists() or old.count() == 0:
            raise InputError("the collection is empty: run `rag ingest PATH` first")
        old_record = read_record(old.client, old.collection)
        base = make_embeddings(settings)
        base_dir = tuning.base_model_dir(base.model_dir, settings.embedding)
        if old_record.base_model not in (None, base.name):
            raise InputError(
                f"{old.collection} was tuned from {old_record.base_model}, but RAG_EMBEDDING names "
                f"{base.name}: tune from the same base model"
            )

        chunks = tuning.read_chunks(old)
        generated = question_writer(chunks) if question_writer else None
        mined = tuning.mine_pairs(chunks, config, generated)
        seconds["mining"] = time.perf_counter() - started

        cache_dir = Path(settings.cache_dir).expanduser()
        cache_dir.mkdir(parents=True, exist_ok=True)
        work_dir = Path(tempfile.mkdtemp(prefix="tune-", dir=cache_dir))
        try:
            model, seconds["training"] = tuning.timed(
                lambda: tuning.train_model(base_dir, mined.train, config, work_dir, progress)
            )
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        record = tuning.TrainingRecord(
            base_model=base.name,
            collection=settings.collection,
            created=tuning.now(),
            seconds=round(seconds["training"], 1),
            config={**vars(config), "epochs": config.epochs_for(len(mined.train))},
            data=mined.summary(),
            generated_questions=sum(len(v) for v in (generated or {}).values()),
        )
        model_dir = tuning.save_model(model, cache_dir, base.name, record.as_dict())
        del model

        tuned = make_embeddings(settings.model_copy(update={"embedding": str(model_dir)}))
        name = tuned_collection_name(settings.collection, model_dir.name)
        if name == old.collection:
            raise InputError(
                f"{name} serves {settings.collection} already: the tuned model came out the same"
            )
        if old.client.has_collection(name):
            old.client.drop_collection(name)  # an earlier build that is not serving
        step = time.perf_counter()
        built = make_store(settings.model_copy(update={"collection": name}), tuned)
        tuning.write_in_batches(built, chunks, settings.embedding_batch_size, progress)
        built.flush()
        tuning.catch_up(old, built, settings.embedding_batch_size, progress)
        write_model(
            built.client,
            name,
            {
                "embedding_model": tuned.name,
                "dimension": tuned.dimension,
                "base_model": base.name,
                "tuned_from": old.collection,
                "training": mined.summary(),
            },
        )
        seconds["re-embedding"] = time.perf_counter() - step

        step = time.perf_counter()
        held_out = [EvalRow(f"held-out-{n}", *row) for n, row in enumerate(tuning.as_rows(mined.holdout))]
        sets = {"held-out sentences": held_out}
        if eval_rows:
            sets[Path(eval_file or "").name] = eval_rows
        before: dict[str, dict[str, Any]] = {}
        after: dict[str, dict[str, Any]] = {}
        for store, results in ((old, before), (built, after)):
            retriever = make_retriever(store, settings.top_k, settings.search, settings.max_k)
            for set_name, rows in sets.items():
                if rows:
                    metrics = evaluate(partial(_retrieve, retriever), rows)
                    metrics.pop("missed@3", None)
                    results[set_name] = metrics
        seconds["evaluation"] = time.perf_counter() - step

        worse = [n for n in before if after[n]["mrr@10"] < before[n]["mrr@10"]]
        switched = force or not worse
        reason = f"worse on {', '.join(worse)}" if worse else "not worse"
        if force and worse:
            reason = f"forced, {reason}"
        figures = {
            "search": settings.search,
            "before": {n: _rounded(m) for n, m in before.items()},
            "after": {n: _rounded(m) for n, m in after.items()},
            "switched": switched,
            "reason": reason,
            "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "measured": tuning.now(),
        }
        write_tune_figures(built.client, name, figures)
        tuning.update_model_record(model_dir, figures=figures)
        if switched:
            point_to(old.client, settings.collection, name)
            # Keep the new collection and the one it replaced (for --rollback); drop older ones.
            for stale in tuned_collections(old.client, settings.collection):
                if stale not in (name, old.collection):
                    old.client.drop_collection(stale)
            original = settings.collection
            if original not in (name, old.collection) and old.client.has_collection(original):
                old.client.drop_collection(original)
        else:
            old.client.drop_collection(name)
        seconds["total"] = time.perf_counter() - started
        return TuneReport(
            collection=settings.collection,
            previous=old.collection,
            built=name,
            model=model_dir.name,
            model_dir=str(model_dir),
            switched=switched,
            reason=reason,
            before=before,
            after=after,
            data=mined.summary(),
            seconds={k: round(v, 1) for k, v in seconds.items()},
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            search=settings.search,
        )
    except BaseException:
        if built is not None and not switched:
            try:
                built.client.drop_collection(built.collection)
            except Exception:
                log.warning("could not drop the unfinished collection %s", built.collection, exc_info=True)
        raise
    finally:
        if built is not None:
            built.embeddings.close()
            built.client.close()
        service.close()


def _retrieve(retriever: Any, query: str, depth: int) -> list[Any]:
    return list(retriever.retrieve(query, k=depth))


def _rounded(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}


def rollback_collection(settings: Settings) -> tuple[str, str]:
    """Point RAG_COLLECTION back at the collection the serving one replaced: (from, to)."""
    from errors import InputError
    from store.active import point_to

    service = open_service(settings, llm=None)
    try:
        store = service.get_store()
        record = read_record(store.client, store.collection) if store.exists() else None
        previous = record.tuned_from if record else None
        if not previous:
            raise InputError(f"{settings.collection} is served by {store.collection}, which replaced nothing")
        if not store.client.has_collection(previous):
            raise InputError(f"{store.collection} replaced {previous}, which no longer exists")
        point_to(store.client, settings.collection, previous)
        return store.collection, previous
    finally:
        service.close()


def open_knowledge_bases(
    settings: Settings, llm: Any = "auto", default: RagService | None = None
) -> dict[str, RagService]:
    """A service per knowledge base (settings.knowledge_base_names), the default one first,
    each on its own collection; they share the LLM client and the embedding model.

    `default`: the service of the default knowledge base, when the caller has one.
    """
    default = default or open_service(settings, llm=llm)
    services = {DEFAULT_KB: default}
    for name in settings.knowledge_base_names[1:]:
        services[name] = open_service(
            settings.for_knowledge_base(name), llm=default.llm, embeddings=default.base_embeddings
        )
    return services
