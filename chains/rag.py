"""The RAG chain: (history) → standalone question → retrieve → numbered context → prompt →
DeepSeek → a stream of sources, reasoning, answer tokens and usage."""

from __future__ import annotations

import asyncio
import enum
import random
import threading
import types
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from langchain_core.documents import Document
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    convert_to_messages,
)
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableConfig, RunnableGenerator
from langchain_core.runnables.utils import AddableDict, ConfigurableFieldSpec, get_unique_config_specs
from pydantic import BaseModel, BeforeValidator, Field, create_model

from chains.llm import THINKING, describe_llm_error, is_retryable, retry_after, with_thinking
from chains.prompts import CONDENSE_PROMPT, RAG_PROMPT, format_context, format_history
from errors import InputError, LLMError, LLMTimeoutError, RagError
from loaders.markdown import citation, heading_path

MAX_QUESTION_CHARS = 4000
MAX_HISTORY_ITEMS = 200


def _to_turn(item: Any) -> Any:
    """One history item as a message: LangChain messages and their dicts, OpenAI-style
    {"role", "content"} dicts, or ("human", "...") pairs."""
    if isinstance(item, BaseMessage):
        message = item
    elif isinstance(item, dict | list | tuple):
        try:
            (message,) = convert_to_messages([tuple(item) if isinstance(item, list) else item])
        except (ValueError, TypeError, NotImplementedError, KeyError) as exc:
            raise ValueError(f"not a chat message: {exc}") from exc
    else:
        raise ValueError("a chat message is a {'type'|'role', 'content'} object or a [role, content] pair")
    if message.type not in ("human", "ai"):
        raise ValueError(f"only the user's and the assistant's turns, not {message.type!r} messages")
    return message


# The conversation so far: the user's and the assistant's turns (system messages are the
# service's own, never the client's).
ChatTurn = Annotated[HumanMessage | AIMessage, BeforeValidator(_to_turn)]
ChatHistory = list[ChatTurn]


class RagInput(BaseModel):
    """What the chain takes: a question, and the conversation so far (optional)."""

    question: str = Field(..., min_length=1, max_length=MAX_QUESTION_CHARS)
    chat_history: ChatHistory = Field(default_factory=list, max_length=MAX_HISTORY_ITEMS)


def input_model(max_question_chars: int) -> type[BaseModel]:
    """RagInput with the configured question length limit."""
    if max_question_chars == MAX_QUESTION_CHARS:
        return RagInput
    return create_model(
        "RagInput",
        __doc__=RagInput.__doc__,
        question=(str, Field(..., min_length=1, max_length=max_question_chars)),
        chat_history=(ChatHistory, Field(default_factory=list, max_length=MAX_HISTORY_ITEMS)),
    )


class Source(BaseModel):
    """One retrieved passage, numbered as the answer cites it."""

    n: int
    source: str
    headers: list[str]
    page: int | None = Field(None, description="The first page of a PDF passage.")
    last_page: int | None = Field(None, description="The last page of a PDF passage.")
    text: str
    score: float


class Usage(BaseModel):
    """Token counts that DeepSeek reported; cache counts where it gave them."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_cache_hit_tokens: int | None = None
    prompt_cache_miss_tokens: int | None = None


class StreamError(BaseModel):
    """Why a stream ended early (sent as the last chunk before the error)."""

    status_code: int
    message: str


class RagOutput(BaseModel):
    """What the chain returns. Streamed, the keys arrive in this order."""

    question: str | None = Field(None, description="The standalone question, when history was given.")
    sources: list[Source]
    reasoning: str | None = Field(None, description="The model's reasoning, with thinking on.")
    answer: str
    usage: Usage | None = None
    error: StreamError | None = None


@dataclass(frozen=True)
class AnswerPolicy:
    """Time limits and retries for DeepSeek's answer."""

    deadline: float = 120.0  # seconds for the whole answer
    stall_timeout: float = 30.0  # seconds of silence between streamed chunks
    max_retries: int = 2  # only before the first token
    retry_backoff: float = 0.5  # first wait; doubles each time

    @classmethod
    def from_settings(cls, settings: Any) -> AnswerPolicy:
        """The policy that settings describe."""
        return cls(
            deadline=settings.deepseek_deadline,
            stall_timeout=settings.deepseek_stall_timeout,
            max_retries=settings.deepseek_max_retries,
            retry_backoff=settings.deepseek_retry_backoff,
        )


def to_sources(documents: list[Document]) -> list[dict[str, Any]]:
    """The `sources` list of the output, numbered from 1 like the prompt's passages."""
    return [
        {
            "n": n,
            "source": d.metadata.get("source", ""),
            "headers": list(d.metadata.get("headers") or []),
            "page": d.metadata.get("page"),
            "last_page": d.metadata.get("last_page"),
            "text": d.page_content,
            "score": float(d.metadata.get("score", 0.0)),
        }
        for n, d in enumerate(documents, start=1)
    ]


# How much of each passage an answer without an LLM shows.
PASSAGE_PREVIEW_CHARS = 300


def passage_preview(document: Document, limit: int = PASSAGE_PREVIEW_CHARS) -> str:
    """A passage's text on one line, cut at a word near `limit` characters, without the
    heading path that chunks start with (the list of sources names the section)."""
    text = document.page_content
    section = heading_path(list(document.metadata.get("headers") or []))
    if section and text.startswith(section):
        text = text[len(section) :]
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0] or text[:limit]
    return cut.rstrip(",;:.") + " …"


def offline_answer(documents: list[Document]) -> str:
    """The answer when no LLM is configured: say so, then what each retrieved passage says,
    numbered like the sources (which come with the answer and name each passage)."""
    note = "No LLM is configured: set DEEPSEEK_API_KEY to get generated answers."
    if not documents:
        return f"{note}\nNo passages were retrieved for this question."
    passages = [f"[{n}] {passage_preview(d)}" for n, d in enumerate(documents, start=1)]
    return "\n\n".join([f"{note} The passages retrieved for this question:", *passages])


def usage_of(message: AIMessageChunk | None) -> dict[str, int] | None:
    """DeepSeek's usage in OpenAI's names, from LangChain's usage metadata."""
    meta = message.usage_metadata if message is not None else None
    if not meta:
        return None
    usage = {
        "prompt_tokens": meta["input_tokens"],
        "completion_tokens": meta["output_tokens"],
        "total_tokens": meta["total_tokens"],
    }
    hit = (meta.get("input_token_details") or {}).get("cache_read")
    if hit is not None:
        # DeepSeek: prompt_tokens = cache hits + cache misses.
        usage["prompt_cache_hit_tokens"] = hit
        usage["prompt_cache_miss_tokens"] = meta["input_tokens"] - hit
    return usage


def parse_input(
    inputs: Any, max_question_chars: int, config: RunnableConfig | None = None
) -> tuple[str, list[BaseMessage]]:
    """The stripped question and the history as messages; InputError if unusable."""
    if isinstance(inputs, BaseModel):
        inputs = dict(inputs)
    if not isinstance(inputs, dict):
        inputs = {"question": inputs}
    question = str(inputs.get("question") or "").strip()
    if not question:
        raise InputError("the question is empty")
    if len(question) > max_question_chars:
        raise InputError(
            f"the question is {len(question)} characters long; the limit is {max_question_chars} "
            "(RAG_MAX_QUESTION_CHARS)"
        )
    try:
        messages = [_to_turn(item) for item in inputs.get("chat_history") or []]
    except ValueError as exc:
        raise InputError(f"chat_history: {exc}") from exc
    temperature = (config or {}).get("configurable", {}).get("temperature")
    if temperature is not None and not 0 <= float(temperature) <= 2:
        raise InputError(f"temperature must be between 0 and 2, not {temperature}")
    return question, messages


class RagChain:
    """The steps of one answer; `runnable()` wraps them as a LangChain Runnable."""

    def __init__(
        self,
        retriever: BaseRetriever | Runnable,
        llm: Runnable | None,
        prompt: ChatPromptTemplate = RAG_PROMPT,
        max_question_chars: int = MAX_QUESTION_CHARS,
        policy: AnswerPolicy | None = None,
        history_messages: int = 8,
        describe_error: Callable[[BaseException], RagError | None] | None = None,
    ) -> None:
        self.describe_error = describe_error
        self.retriever = retriever
        self.llm = llm
        self.prompt = prompt
        self.max_question_chars = max_question_chars
        self.policy = policy or AnswerPolicy()
        self.history_messages = history_messages
        # The answer thinks only when the request asks (the `thinking` config field); rewriting
        # the question never needs the model's reasoning.
        self.answer_llm = {on: with_thinking(llm, on) for on in (False, True)} if llm else {}
        self.condense = CONDENSE_PROMPT | with_thinking(llm, False) if llm else None

    async def _standalone_question(
        self, question: str, history: list[BaseMessage], config: RunnableConfig, deadline_at: float
    ) -> str:
        if self.condense is None:
            # No model to rewrite it: search with the last question asked as well.
            asked = [m.text for m in history if m.type == "human"]
            return f"{asked[-1]}\n{question}" if asked else question
        message = await self._with_deadline(
            self.condense.ainvoke({"history": format_history(history), "question": question}, config),
            deadline_at,
        )
        rewritten = StrOutputParser().invoke(message).strip()
        return rewritten or question

    async def astream(self, inputs: Any, config: RunnableConfig) -> AsyncIterator[dict[str, Any]]:
        """The answer as chunks: question?, sources, reasoning*, answer+, usage?.

        A failure ends the stream with an `error` chunk that says why, then raises: LangServe
        sends every exception as the same generic 500, so the chunk is how a streaming client
        learns the reason.
        """
        try:
            async for chunk in self._steps(inputs, config):
                yield chunk
        except RagError as exc:
            yield AddableDict(error={"status_code": exc.status_code, "message": str(exc)})
            raise

    async def _steps(self, inputs: Any, config: RunnableConfig) -> AsyncIterator[dict[str, Any]]:
        question, history = parse_input(inputs, self.max_question_chars, config)
        deadline_at = asyncio.get_running_loop().time() + self.policy.deadline
        history = history[-self.history_messages :] if self.history_messages else []
        query = question
        if history:
            query = await self._standalone_question(question, history, config, deadline_at)
            yield AddableDict(question=query)
        documents = await self.retriever.ainvoke(query, config)
        yield AddableDict(sources=to_sources(documents))
        if self.llm is None:
            yield AddableDict(answer=offline_answer(documents))
            return
        messages = self.prompt.format_messages(
            context=format_context(documents), question=query, chat_history=history
        )
        async for chunk in self._answer(messages, config, deadline_at):
            yield chunk

    async def _answer(
        self, messages: list[BaseMessage], config: RunnableConfig, deadline_at: float
    ) -> AsyncIterator[dict[str, Any]]:
        """DeepSeek's answer; the deadline counts from the start of the request."""
        llm = self.answer_llm[bool(config.get("configurable", {}).get("thinking"))]
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            sent_tokens = False
            usage: AIMessageChunk | None = None
            try:
                async with ReadInTask(llm.astream(messages, config)) as stream:
                    while True:
                        chunk = await self._next_chunk(stream, deadline_at)
                        if chunk is None:
                            break
                        reasoning = chunk.additional_kwargs.get("reasoning_content")
                        if reasoning:
                            sent_tokens = True
                            yield AddableDict(reasoning=reasoning)
                        if chunk.text:
                            sent_tokens = True
                            yield AddableDict(answer=chunk.text)
                        if chunk.usage_metadata:
                            usage = chunk
                break
            except Exception as exc:
                error = self._describe(exc, mid_answer=sent_tokens)
                if error is None:
                    raise  # not DeepSeek's doing: a bug, left as it is
                if sent_tokens or attempt >= self.policy.max_retries or not is_retryable(exc):
                    raise error from exc
                wait = self._backoff(attempt, exc)
                if loop.time() + wait >= deadline_at:
                    raise error from exc
                attempt += 1
                await asyncio.sleep(wait)
        if not sent_tokens:
            raise LLMError("DeepSeek returned an empty answer")
        final_usage = usage_of(usage)
        if final_usage is not None:
            yield AddableDict(usage=final_usage)

    async def _next_chunk(self, stream: ReadInTask, deadline_at: float) -> AIMessageChunk | None:
        # A read timeout alone never fires: DeepSeek sends keep-alive comments while it is
        # busy, so both limits are kept here, between the chunks the client parses.
        left = deadline_at - asyncio.get_running_loop().time()
        limit = min(self.policy.stall_timeout, left)
        try:
            # asyncio.timeout, not wait_for: no task per chunk (Python 3.11's wait_for makes one).
            async with asyncio.timeout(max(limit, 0.0)):
                return await stream.next()  # type: ignore[no-any-return]
        except TimeoutError:
            if limit < self.policy.stall_timeout:
                raise LLMTimeoutError(
                    f"DeepSeek's answer took longer than {self.policy.deadline:g} s (DEEPSEEK_DEADLINE)"
                ) from None
            raise LLMTimeoutError(
                f"DeepSeek's stream stalled: nothing for {self.policy.stall_timeout:g} s "
                "(DEEPSEEK_STALL_TIMEOUT)"
            ) from None

    async def _with_deadline(self, awaitable: Any, deadline_at: float) -> Any:
        left = deadline_at - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(awaitable, timeout=max(left, 0.0))
        except TimeoutError:
            raise LLMTimeoutError(
                f"DeepSeek did not rewrite the follow-up question within the answer's "
                f"{self.policy.deadline:g} s (DEEPSEEK_DEADLINE)"
            ) from None
        except Exception as exc:
            error = self._describe(exc)
            if error is None:
                raise
            raise error from exc

    def _backoff(self, attempt: int, exc: BaseException) -> float:
        asked = retry_after(exc)
        if asked is not None:
            return min(asked, 30.0)
        base = self.policy.retry_backoff * (2**attempt)
        return base * (0.5 + random.random() / 2)  # jitter: clients that failed together spread out

    def _describe(self, exc: BaseException, mid_answer: bool = False) -> RagError | None:
        if isinstance(exc, RagError):
            return exc
        if mid_answer and is_retryable(exc):
            return LLMError(f"the connection to DeepSeek broke in the middle of the answer: {exc}")
        describe = self.describe_error or describe_llm_error
        return describe(exc)

    def runnable(self) -> Runnable:
        """This chain as a Runnable: stream, invoke, batch, sync and async."""
        parts = [self.retriever, self.llm] if self.llm is not None else [self.retriever]
        specs = [spec for part in parts for spec in part.config_specs]
        if self.llm is not None:
            specs.append(THINKING)
        specs = get_unique_config_specs(specs)
        return generator_runnable(self.astream, "rag", specs)


def playground_spec(spec: ConfigurableFieldSpec) -> ConfigurableFieldSpec:
    """A per-request setting as LangServe's config model and playground can take it.

    - An option field (`model`) is an Enum, which pydantic writes as a `$ref` to a
      definition: the playground's select then shows no default ("None"). A Literal of the
      same values is written in place, with its default.
    - An optional field with a value for default (ChatOpenAI's `temperature: float | None
      = 0.0`) is written by pydantic as `anyOf: [X, {"type": "null"}]`, which the
      playground's form renderer cannot draw: the whole page stays blank. It becomes X.
    """
    annotation, default = spec.annotation, spec.default
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        values = tuple(member.value for member in annotation)
        return spec._replace(
            annotation=Literal[values],  # type: ignore[valid-type]
            default=default.value if isinstance(default, enum.Enum) else default,
        )
    if get_origin(annotation) in (Union, types.UnionType) and default is not None:
        kinds = [kind for kind in get_args(annotation) if kind is not type(None)]
        if len(kinds) == 1:
            return spec._replace(annotation=kinds[0])
    return spec


_END = object()
# Readers still running, so that none is garbage-collected while it closes its stream.
_readers: set[asyncio.Task[None]] = set()


class ReadInTask:
    """An async iterator read by a task of its own: `next()` hands over what it has read,
    None at the end; leaving `async with` stops it and closes the iterator.

    Why a task: closing the model's stream is what closes the request to DeepSeek, and that
    close must run to its end. When a client leaves, anyio cancels the task that serves it
    again and again until it is done, and LangChain runs each step of a chain in a task of its
    own that takes every one of those cancellations (shields inside it don't hold): a close
    run there was interrupted, and the connection stayed open while DeepSeek went on
    generating for nobody. This task is cancelled once, here, and by nothing else.
    """

    def __init__(self, stream: AsyncIterator[Any]) -> None:
        self._received: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()
        self._stopped = False
        self._task = asyncio.get_running_loop().create_task(self._read(stream))
        _readers.add(self._task)
        self._task.add_done_callback(_readers.discard)

    async def _read(self, stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                self._received.put_nowait((item, None))
                # Let the consumer take it now: a burst that is already buffered would
                # otherwise be read to its end before the first piece moves on.
                await asyncio.sleep(0)
            self._received.put_nowait((_END, None))
        except Exception as exc:  # raised to the consumer by next()
            self._received.put_nowait((_END, exc))
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    async def next(self) -> Any:
        """The next item, or None at the end; the iterator's exception, if it raised one."""
        item, error = await self._received.get()
        if error is not None:
            raise error
        return None if item is _END else item

    async def __aenter__(self) -> ReadInTask:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if not self._stopped:
            self._stopped = True
            self._task.cancel()  # nothing when it is done
        # asyncio.wait, not `await task`: a cancellation of the caller must not reach the task.
        await asyncio.wait({self._task})


class _GeneratorWithConfig(RunnableGenerator):
    # A generator hides the runnables it calls; these specs tell LangServe which
    # per-request settings (k, model, thinking...) it takes and validates.
    def __init__(self, *args: Any, specs: list[ConfigurableFieldSpec], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._specs = [playground_spec(spec) for spec in specs]

    @property
    def config_specs(self) -> list[ConfigurableFieldSpec]:
        return self._specs


def generator_runnable(
    astream: Callable[[Any, RunnableConfig], AsyncIterator[Any]],
    name: str,
    config_specs: list[ConfigurableFieldSpec] | None = None,
) -> Runnable:
    """A Runnable around one async generator function; sync calls run it on a background loop."""

    async def arun(inputs: AsyncIterator[Any], config: RunnableConfig) -> AsyncIterator[Any]:
        async for chunk in astream(await _last(inputs), config):
            yield chunk

    def run(inputs: Iterator[Any], config: RunnableConfig) -> Iterator[Any]:
        whole = None
        for piece in inputs:
            whole = _merge(whole, piece)
        yield from iterate_in_background_loop(astream(whole, config))

    return _GeneratorWithConfig(run, arun, name=name, specs=config_specs or [])  # type: ignore[arg-type]


def format_sources(sources: list[dict[str, Any]]) -> str:
    """The sources as the lines printed under an answer."""
    return "\n".join(
        f"[{s['n']}] " + citation(s["source"], s["headers"], s.get("page"), s.get("last_page"))
        for s in sources
    )


def build_chat_chain(rag_chain: Runnable) -> Runnable:
    """The RAG chain for chat UIs: same input, the answer as text with its sources under it.

    This is the shape LangServe's chat playground renders (a string output).
    """

    async def astream(inputs: Any, config: RunnableConfig) -> AsyncIterator[str]:
        sources: list[dict[str, Any]] = []
        async for chunk in rag_chain.astream(inputs, config):
            sources = chunk.get("sources", sources)
            if chunk.get("answer"):
                yield chunk["answer"]
        if sources:
            yield "\n\nSources:\n" + format_sources(sources)

    chain = generator_runnable(astream, "chat", rag_chain.config_specs).with_types(
        input_type=rag_chain.input_schema,
        output_type=str,  # type: ignore[arg-type]
    )
    return chain.with_config(run_name="chat")


def _merge(whole: Any, piece: Any) -> Any:
    # LangChain may hand the input over in pieces (from an upstream stream): keep the whole.
    return piece if whole is None or not isinstance(whole, AddableDict) else whole + piece


async def _last(inputs: AsyncIterator[Any]) -> Any:
    whole = None
    async for piece in inputs:
        whole = _merge(whole, piece)
    return whole


_background: tuple[asyncio.AbstractEventLoop, threading.Thread] | None = None
_background_lock = threading.Lock()


def _background_loop() -> asyncio.AbstractEventLoop:
    # One loop for every synchronous caller in the process: the model's async HTTP client
    # keeps pooled connections that belong to the loop that opened them.
    global _background
    with _background_lock:
        if _background is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="rag-sync-bridge", daemon=True)
            thread.start()
            _background = (loop, thread)
        return _background[0]


def iterate_in_background_loop(stream: AsyncIterator[Any]) -> Iterator[Any]:
    """Iterate an async generator from synchronous code.

    The answer's limits (deadline, stall) are enforced with asyncio, so synchronous callers
    run the same code on a background loop rather than a second, blocking implementation.
    """
    loop = _background_loop()

    def step() -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(anext(stream), loop)  # type: ignore[arg-type]

    try:
        while True:
            try:
                yield step().result()
            except StopAsyncIteration:
                return
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            asyncio.run_coroutine_threadsafe(aclose(), loop).result()


def build_rag_chain(
    retriever: BaseRetriever | Runnable,
    llm: Runnable | None,
    prompt: ChatPromptTemplate = RAG_PROMPT,
    max_question_chars: int = MAX_QUESTION_CHARS,
    policy: AnswerPolicy | None = None,
    history_messages: int = 8,
    describe_error: Callable[[BaseException], RagError | None] | None = None,
) -> Runnable:
    """The RAG chain. Input {"question", "chat_history"?}; output {"sources", "answer", ...}.

    Streamed, it yields {"question"} (only with history), then {"sources": [...]}, then
    {"reasoning": "..."} chunks (thinking on), {"answer": "..."} chunks and {"usage": {...}}.
    A failure ends the stream with {"error": {"status_code", "message"}} and raises.
    """
    steps = RagChain(retriever, llm, prompt, max_question_chars, policy, history_messages, describe_error)
    typed = steps.runnable().with_types(
        input_type=input_model(max_question_chars),
        output_type=RagOutput,  # type: ignore[arg-type]
    )
    return typed.with_config(run_name="rag")
