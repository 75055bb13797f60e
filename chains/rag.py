"""The LCEL chain: question → retrieve → numbered context → prompt → DeepSeek → answer + sources."""

from __future__ import annotations

from operator import itemgetter
from typing import Any

from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableLambda, RunnableParallel, RunnablePassthrough
from pydantic import BaseModel, Field, create_model

from chains.prompts import RAG_PROMPT, format_context
from loaders.markdown import heading_path

MAX_QUESTION_CHARS = 4000


class RagInput(BaseModel):
    """What the chain takes."""

    question: str = Field(..., min_length=1, max_length=MAX_QUESTION_CHARS)


def input_model(max_question_chars: int) -> type[BaseModel]:
    """RagInput with the configured question length limit."""
    if max_question_chars == MAX_QUESTION_CHARS:
        return RagInput
    return create_model(
        "RagInput",
        __doc__=RagInput.__doc__,
        question=(str, Field(..., min_length=1, max_length=max_question_chars)),
    )


class Source(BaseModel):
    """One retrieved passage, numbered as the answer cites it."""

    n: int
    source: str
    headers: list[str]
    text: str
    score: float


class RagOutput(BaseModel):
    """What the chain returns."""

    answer: str
    sources: list[Source]


def to_sources(documents: list[Document]) -> list[dict[str, Any]]:
    """The `sources` list of the output, numbered from 1 like the prompt's passages."""
    return [
        {
            "n": n,
            "source": d.metadata.get("source", ""),
            "headers": list(d.metadata.get("headers") or []),
            "text": d.page_content,
            "score": float(d.metadata.get("score", 0.0)),
        }
        for n, d in enumerate(documents, start=1)
    ]


def offline_answer(inputs: dict[str, Any]) -> str:
    """The answer when no LLM is configured: say so, then list what was retrieved."""
    documents: list[Document] = inputs["docs"]
    lines = ["No LLM is configured: set DEEPSEEK_API_KEY to get generated answers."]
    if not documents:
        lines.append("No passages were retrieved for this question.")
    else:
        lines.append("Retrieved passages:")
    for n, d in enumerate(documents, start=1):
        where = heading_path(list(d.metadata.get("headers") or []))
        lines.append(f"[{n}] {d.metadata.get('source', '')}" + (f" — {where}" if where else ""))
    return "\n".join(lines)


def _question(inputs: dict[str, Any]) -> str:
    question = inputs["question"] if isinstance(inputs, dict) else inputs
    return str(question).strip()


def build_rag_chain(
    retriever: BaseRetriever | Runnable,
    llm: BaseChatModel | None,
    prompt: ChatPromptTemplate = RAG_PROMPT,
    max_question_chars: int = MAX_QUESTION_CHARS,
) -> Runnable:
    """The RAG chain. Input {"question"}, output {"answer", "sources"}.

    The output is a RunnableParallel, so a stream yields {"sources": [...]} as one chunk
    and the answer as token chunks {"answer": "..."}.
    """
    answer: Runnable
    if llm is None:
        answer = RunnableLambda(offline_answer)
    else:
        answer = (
            RunnableParallel(context=lambda x: format_context(x["docs"]), question=itemgetter("question"))
            | prompt
            | llm
            | StrOutputParser()
        )
    chain: Runnable = (
        RunnableLambda(lambda x: {"question": _question(x)})
        | RunnablePassthrough.assign(docs=itemgetter("question") | retriever)
        | RunnableParallel(sources=lambda x: to_sources(x["docs"]), answer=answer)
    )
    typed = chain.with_types(
        input_type=input_model(max_question_chars),
        output_type=RagOutput,  # type: ignore[arg-type]
    )
    return typed.with_config(run_name="rag")
