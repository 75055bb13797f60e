"""Composition of the stages for the CLI and the server: settings in, a ready service out."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool

from chains.rag import AnswerPolicy, build_chat_chain, build_rag_chain
from chains.retrieval import MilvusRetriever, make_retriever, per_request_settings
from errors import StoreError
from loaders.markdown import Chunker, token_counter
from settings import DEFAULT_KB, Settings
from store.embeddings import PymilvusEmbeddings, load_tokenizer, make_embeddings
from store.milvus import RagStore, make_store

log = logging.getLogger(__name__)


@dataclass
class RagService:
    """Settings, the embedding model, the store (opened on demand), retriever, LLM and chain."""

    settings: Settings
    embeddings: PymilvusEmbeddings
    llm: Any = None
    _store: RagStore | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    retriever: MilvusRetriever = field(init=False)
    # The same retriever with k, mode and filters settable per request (LangServe config).
    configurable_retriever: Runnable = field(init=False)
    chain: Runnable = field(init=False)
    # The same chain for chat UIs: the answer as text with the sources under it.
    chat_chain: Runnable = field(init=False)

    def __post_init__(self) -> None:
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
        """The open store; opens it (again) if it isn't, raising StoreError if Milvus is down."""
        if self._store is None:
            with self._lock:
                if self._store is None:
                    self._store = make_store(self.settings, self.embeddings)
        return self._store

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
            settings.for_knowledge_base(name), llm=default.llm, embeddings=default.embeddings
        )
    return services
