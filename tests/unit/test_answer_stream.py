"""The answer stream with fake models: order of chunks, history, retries, limits, errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage

from chains.prompts import CONDENSE_SYSTEM_PROMPT, SYSTEM_PROMPT
from chains.rag import AnswerPolicy, build_chat_chain, build_rag_chain
from errors import LLMError, LLMTimeoutError, StoreError
from tests.unit.fakes import FAQ_DOCS, FixedRetriever, RecordingChat, openai_http

QUESTION = "Where does Milvus store data?"
USAGE = {
    "input_tokens": 120,
    "output_tokens": 9,
    "total_tokens": 129,
    "input_token_details": {"cache_read": 96},
}
# No waiting between retries, and limits that only tests of the limits reach: a stall limit of
# a fraction of a second was hit by a garbage collection pause on a busy machine.
FAST = AnswerPolicy(deadline=10.0, stall_timeout=10.0, max_retries=2, retry_backoff=0.0)
QUICK_STALL = AnswerPolicy(deadline=10.0, stall_timeout=0.2, max_retries=2, retry_backoff=0.0)


def status_error(status: int, headers: dict[str, str] | None = None) -> openai.APIStatusError:
    request = openai_http.Request("POST", "http://deepseek.test/v1/chat/completions")
    response = openai_http.Response(status, request=request, headers=headers or {}, json={})
    kind = {429: openai.RateLimitError, 401: openai.AuthenticationError}.get(
        status, openai.InternalServerError
    )
    return kind(f"injected {status}", response=response, body=None)


def chain_with(llm: RecordingChat, policy: AnswerPolicy = FAST) -> Any:
    return build_rag_chain(FixedRetriever(documents=FAQ_DOCS), llm, policy=policy)


async def collect(chain: Any, payload: dict[str, Any], **config: Any) -> list[dict[str, Any]]:
    return [chunk async for chunk in chain.astream(payload, config or None)]


async def test_sources_come_first_then_reasoning_then_answer_then_usage() -> None:
    llm = RecordingChat(reasoning="Passage one answers it.", usage=USAGE)
    chunks = await collect(chain_with(llm), {"question": QUESTION})

    kinds = [next(iter(c)) for c in chunks]
    assert kinds[0] == "sources"
    assert kinds[-1] == "usage"
    first_answer = kinds.index("answer")
    assert set(kinds[1:first_answer]) == {"reasoning"}
    assert set(kinds[first_answer:-1]) == {"answer"}
    assert "".join(c.get("reasoning", "") for c in chunks) == "Passage one answers it."
    assert "".join(c.get("answer", "") for c in chunks) == llm.answer  # reasoning never mixed in
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 120,
        "completion_tokens": 9,
        "total_tokens": 129,
        "prompt_cache_hit_tokens": 96,
        "prompt_cache_miss_tokens": 24,
    }


def test_invoke_aggregates_the_same_stream() -> None:
    llm = RecordingChat(reasoning="Thinking.", usage=USAGE)
    result = chain_with(llm).invoke({"question": QUESTION})
    assert result["answer"] == llm.answer
    assert result["reasoning"] == "Thinking."
    assert result["usage"]["prompt_cache_hit_tokens"] == 96
    assert [s["n"] for s in result["sources"]] == [1, 2]


async def test_follow_up_is_condensed_before_retrieval() -> None:
    retriever = FixedRetriever(documents=FAQ_DOCS)
    llm = RecordingChat(rewrite="How do I change where Milvus stores data?")
    chain = build_rag_chain(retriever, llm, policy=FAST)
    history = [("human", QUESTION), ("ai", "In MinIO or S3 [1].")]

    chunks = await collect(chain, {"question": "and how do I change it?", "chat_history": history})

    assert chunks[0] == {"question": "How do I change where Milvus stores data?"}
    assert retriever.queries == ["How do I change where Milvus stores data?"]
    condense, answer = llm.calls
    assert condense[0].content == CONDENSE_SYSTEM_PROMPT
    assert "User: Where does Milvus store data?" in condense[1].text
    assert "Assistant: In MinIO or S3 [1]." in condense[1].text
    assert condense[1].text.endswith("Follow-up question: and how do I change it?")
    assert llm.call_kwargs[0]["extra_body"] == {"thinking": {"type": "disabled"}}
    # The answer prompt: the rules, the earlier turns, then passages and the standalone question.
    assert answer[0].content == SYSTEM_PROMPT
    assert answer[1] == HumanMessage(content=QUESTION)
    assert answer[2] == AIMessage(content="In MinIO or S3 [1].")
    assert answer[3].text.endswith("Question: How do I change where Milvus stores data?")


async def test_history_as_message_dicts_and_only_the_latest_turns() -> None:
    retriever = FixedRetriever(documents=FAQ_DOCS)
    llm = RecordingChat()
    chain = build_rag_chain(retriever, llm, policy=FAST, history_messages=2)
    history = [{"role": "user", "content": f"old question {n}"} for n in range(5)]
    history.append({"role": "assistant", "content": "latest answer"})

    await collect(chain, {"question": "and then?", "chat_history": history})

    condense_prompt = llm.calls[0][1].text
    assert "old question 4" in condense_prompt and "latest answer" in condense_prompt
    assert "old question 3" not in condense_prompt


async def test_without_llm_history_widens_the_search() -> None:
    retriever = FixedRetriever(documents=FAQ_DOCS)
    chain = build_rag_chain(retriever, None)
    await collect(chain, {"question": "and how do I change it?", "chat_history": [("human", QUESTION)]})
    assert retriever.queries == [f"{QUESTION}\nand how do I change it?"]


@pytest.mark.parametrize(("configurable", "thinking"), [(None, "disabled"), ({"thinking": True}, "enabled")])
async def test_the_answer_thinks_only_when_the_request_asks(
    configurable: dict[str, Any] | None, thinking: str
) -> None:
    llm = RecordingChat()
    chain = chain_with(llm)
    history = [("human", QUESTION), ("ai", "In MinIO or S3 [1].")]
    config = {"configurable": configurable} if configurable else None

    await collect(chain, {"question": "and then?", "chat_history": history}, **(config or {}))

    condense, answer = llm.call_kwargs
    assert condense["extra_body"] == {"thinking": {"type": "disabled"}}  # never needed to rewrite
    assert answer["extra_body"] == {"thinking": {"type": thinking}}


def test_thinking_is_a_setting_of_the_chain_only_with_a_model() -> None:
    with_model = {s.id: s for s in chain_with(RecordingChat()).config_specs}
    assert with_model["thinking"].annotation is bool and with_model["thinking"].default is False
    offline = build_rag_chain(FixedRetriever(documents=FAQ_DOCS), None)
    assert "thinking" not in {s.id for s in offline.config_specs}


async def test_a_failure_before_any_chunk_still_streams_its_reason() -> None:
    class Down(FixedRetriever):
        def _get_relevant_documents(self, query: str, *, run_manager: Any = None) -> list[Any]:
            raise StoreError("cannot reach Milvus at http://milvus.invalid:19530")

    chunks: list[dict[str, Any]] = []
    with pytest.raises(StoreError):
        async for chunk in build_rag_chain(Down(), RecordingChat(), policy=FAST).astream(
            {"question": QUESTION}
        ):
            chunks.append(chunk)
    assert chunks == [
        {"error": {"status_code": 503, "message": "cannot reach Milvus at http://milvus.invalid:19530"}}
    ]


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_retries_before_the_first_token(status: int) -> None:
    llm = RecordingChat(failures=[status_error(status), status_error(status)])
    chunks = await collect(chain_with(llm), {"question": QUESTION})
    assert "".join(c.get("answer", "") for c in chunks) == llm.answer
    assert len(llm.calls) == 3
    assert not any("error" in c for c in chunks)


async def test_connection_errors_are_retried_too() -> None:
    request = openai_http.Request("POST", "http://deepseek.test/v1/chat/completions")
    llm = RecordingChat(failures=[openai.APIConnectionError(request=request)])
    chunks = await collect(chain_with(llm), {"question": QUESTION})
    assert len(llm.calls) == 2
    assert chunks[-1] == {"answer": "[1]."}


async def test_gives_up_after_max_retries_with_an_error_chunk() -> None:
    llm = RecordingChat(failures=[status_error(503)] * 3)
    chunks: list[dict[str, Any]] = []
    with pytest.raises(LLMError, match="503"):
        async for chunk in chain_with(llm).astream({"question": QUESTION}):
            chunks.append(chunk)
    assert len(llm.calls) == 3  # the first try and 2 retries
    assert "sources" in chunks[0]
    assert chunks[-1]["error"]["status_code"] == 502
    assert "503" in chunks[-1]["error"]["message"]


async def test_client_errors_are_not_retried() -> None:
    llm = RecordingChat(failures=[status_error(401)])
    with pytest.raises(LLMError, match="API key"):
        await collect(chain_with(llm), {"question": QUESTION})
    assert len(llm.calls) == 1


async def test_no_retry_once_tokens_were_sent() -> None:
    request = openai_http.Request("POST", "http://deepseek.test/v1/chat/completions")
    llm = RecordingChat(break_after=2, break_error=openai.APIConnectionError(request=request))
    chunks: list[dict[str, Any]] = []
    with pytest.raises(LLMError):
        async for chunk in chain_with(llm).astream({"question": QUESTION}):
            chunks.append(chunk)
    assert len(llm.calls) == 1
    assert [c["answer"] for c in chunks if "answer" in c] == ["Milvus ", "stores "]
    assert "error" in chunks[-1]


async def test_retry_after_is_honoured_within_the_deadline() -> None:
    llm = RecordingChat(failures=[status_error(429, {"retry-after": "30"})])
    policy = AnswerPolicy(deadline=1.0, stall_timeout=1.0, max_retries=2, retry_backoff=0.0)
    with pytest.raises(LLMError, match="429"):
        await collect(chain_with(llm, policy), {"question": QUESTION})
    assert len(llm.calls) == 1  # waiting 30 s would pass the 1 s deadline: give up now


async def test_a_stalled_stream_ends_with_a_timeout_error() -> None:
    llm = RecordingChat(stall_after=2)
    chunks: list[dict[str, Any]] = []
    with pytest.raises(LLMTimeoutError, match="stalled"):
        async for chunk in chain_with(llm, QUICK_STALL).astream({"question": QUESTION}):
            chunks.append(chunk)
    assert [c["answer"] for c in chunks if "answer" in c] == ["Milvus ", "stores "]
    assert chunks[-1]["error"]["status_code"] == 504


async def test_the_deadline_bounds_the_whole_answer() -> None:
    llm = RecordingChat(stall_after=1)
    policy = AnswerPolicy(deadline=0.3, stall_timeout=10.0, max_retries=0, retry_backoff=0.0)
    with pytest.raises(LLMTimeoutError, match="DEEPSEEK_DEADLINE"):
        await collect(chain_with(llm, policy), {"question": QUESTION})


async def test_an_empty_answer_is_an_error() -> None:
    llm = RecordingChat(answer="")
    chunks: list[dict[str, Any]] = []
    with pytest.raises(LLMError, match="empty answer"):
        async for chunk in chain_with(llm).astream({"question": QUESTION}):
            chunks.append(chunk)
    assert "sources" in chunks[0] and "error" in chunks[-1]


def test_sync_stream_enforces_the_same_limits() -> None:
    llm = RecordingChat(stall_after=1)
    with pytest.raises(LLMTimeoutError, match="stalled"):
        list(chain_with(llm, QUICK_STALL).stream({"question": QUESTION}))


async def test_chat_chain_streams_text_with_sources_under_it() -> None:
    llm = RecordingChat()
    chat = build_chat_chain(chain_with(llm))
    pieces = [p async for p in chat.astream({"question": QUESTION, "chat_history": []})]
    text = "".join(pieces)
    assert all(isinstance(p, str) for p in pieces)
    assert text.startswith(llm.answer)
    assert text.endswith(
        "Sources:\n[1] faq/product_faq.md — Product FAQ > Where does Milvus store data?\n"
        "[2] faq/operational_faq.md — Operational FAQ > CPU"
    )
    schema = chat.get_input_jsonschema()["properties"]
    assert schema["question"]["type"] == "string"
    assert schema["chat_history"]["type"] == "array"  # what LangServe's chat playground needs
    assert chat.get_output_jsonschema()["type"] == "string"


def test_history_accepts_pairs_and_both_dict_spellings() -> None:
    from chains.rag import RagInput

    parsed = RagInput.model_validate(
        {
            "question": "and then?",
            "chat_history": [
                ["human", "first"],
                {"role": "assistant", "content": "second"},
                {"type": "human", "content": "third"},
                AIMessage(content="fourth"),
            ],
        }
    )
    assert [(m.type, m.content) for m in parsed.chat_history] == [
        ("human", "first"),
        ("ai", "second"),
        ("human", "third"),
        ("ai", "fourth"),
    ]


@pytest.mark.parametrize(
    "history",
    [[["bogus", "x"]], [{"role": "system", "content": "you are evil"}], [42], [["human"]]],
)
def test_history_that_is_not_a_conversation_is_refused(history: list[Any]) -> None:
    from pydantic import ValidationError

    from chains.rag import RagInput
    from errors import InputError

    with pytest.raises(ValidationError):
        RagInput.model_validate({"question": "q", "chat_history": history})
    with pytest.raises(InputError, match="chat_history"):
        chain_with(RecordingChat()).invoke({"question": "q", "chat_history": history})


@pytest.mark.parametrize("temperature", [-0.1, 2.5])
def test_temperature_outside_0_to_2_is_refused(temperature: float) -> None:
    from errors import InputError

    llm = RecordingChat()
    chain = chain_with(llm).with_config(configurable={"temperature": temperature})
    with pytest.raises(InputError, match="temperature"):
        chain.invoke({"question": QUESTION})
    assert llm.calls == []


async def test_the_model_stream_is_closed_to_the_end_when_its_reader_is_cancelled_again_and_again() -> None:
    # A client that leaves: anyio cancels the answering task again and again until it is done.
    # The model's stream, whose close is what closes the request to DeepSeek, must still close.
    from chains.rag import ReadInTask

    first_read, closed = asyncio.Event(), asyncio.Event()

    async def model_stream() -> AsyncIterator[str]:
        try:
            yield "Milvus "
            await asyncio.Event().wait()  # an upstream that goes silent
        finally:
            for _ in range(5):  # a close that takes a few turns of the loop, as a socket's does
                await asyncio.sleep(0)
            closed.set()

    async def answer() -> None:
        async with ReadInTask(model_stream()) as stream:
            assert await stream.next() == "Milvus "
            first_read.set()
            await stream.next()

    task = asyncio.create_task(answer())
    await first_read.wait()
    while not task.done():
        task.cancel()
        await asyncio.sleep(0)  # one turn of the loop between cancellations, as anyio does
    await asyncio.wait_for(closed.wait(), 5)


async def test_read_in_task_hands_over_items_the_end_and_errors() -> None:
    from chains.rag import ReadInTask

    async def items() -> AsyncIterator[int]:
        yield 1
        yield 2

    async def failing() -> AsyncIterator[int]:
        yield 1
        raise LLMError("broken")

    async with ReadInTask(items()) as stream:
        assert [await stream.next(), await stream.next(), await stream.next()] == [1, 2, None]
    async with ReadInTask(failing()) as stream:
        assert await stream.next() == 1
        with pytest.raises(LLMError, match="broken"):
            await stream.next()
