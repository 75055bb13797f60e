"""An agent whose tools are this service: LangChain's `create_agent`, DeepSeek as its model,
and `search_docs` / `ask_docs` of a running `rag serve`, reached over HTTP with RemoteRunnable.

    rag serve &                          # or any server: RAG_URL=https://docs.example.com
    DEEPSEEK_API_KEY=sk-... python examples/agent.py "How does Milvus store data?"

The answer is printed as it is written; the tool calls go to stderr. Environment:
RAG_URL (default http://127.0.0.1:8000), RAG_API_KEY (one of the server's RAG_API_KEYS, if
it has any), DEEPSEEK_API_KEY, DEEPSEEK_BASE_URL (default https://api.deepseek.com) and
DEEPSEEK_MODEL (default deepseek-v4-flash). Copy it into your own agent: `remote_tools`
comes from this project's chains/tools.py. It needs LangChain's agents: `pip install -e
'.[examples]'` (`make install` has them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from langchain.agents import create_agent
from langchain_core.messages import AIMessage, AIMessageChunk, ToolMessage
from langchain_deepseek import ChatDeepSeek

from chains.tools import remote_tools

SYSTEM_PROMPT = (
    "You answer questions about the team's documentation. Look things up with the tools "
    "instead of answering from memory: search_docs returns passages with their source and "
    "section, ask_docs a cited answer. Say which sources your answer comes from. If a tool "
    "reports an error, correct the call or say what went wrong; if nothing is found, say so."
)


def deepseek() -> ChatDeepSeek:
    """DeepSeek, configured from the environment."""
    return ChatDeepSeek(  # it reads DEEPSEEK_API_KEY itself
        model_name=os.environ.get("DEEPSEEK_MODEL", "deepseek-v4-flash"),
        api_base=os.environ.get("DEEPSEEK_BASE_URL", "https://api.deepseek.com"),
        temperature=0,
        # Thinking off, as in the service's own answers: ChatDeepSeek does not send the model's
        # reasoning back with the tool results of the next turn.
        extra_body={"thinking": {"type": "disabled"}},
    )


def build_agent(model: Any, rag_url: str, rag_api_key: str | None = None) -> Any:
    """The agent: `model` with this service's tools."""
    return create_agent(model, tools=remote_tools(rag_url, rag_api_key), system_prompt=SYSTEM_PROMPT)


def show_steps(update: dict[str, Any]) -> None:
    """The tool calls and their outcome, on stderr."""
    for step in update.values():
        for message in (step or {}).get("messages", []):
            if isinstance(message, AIMessage):
                for call in message.tool_calls:
                    print(f"[{call['name']} {json.dumps(call['args'])}]", file=sys.stderr, flush=True)
            elif isinstance(message, ToolMessage):
                outcome = f"error: {message.content}" if message.status == "error" else "ok"
                print(f"[{message.name}: {outcome}]", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ask an agent that reads your documents.")
    parser.add_argument("question")
    args = parser.parse_args(argv)
    agent = build_agent(
        deepseek(), os.environ.get("RAG_URL", "http://127.0.0.1:8000"), os.environ.get("RAG_API_KEY")
    )
    inputs = {"messages": [{"role": "user", "content": args.question}]}
    try:
        # "messages": the model's tokens as they come; "updates": each finished step.
        for mode, data in agent.stream(inputs, stream_mode=["messages", "updates"]):
            if mode == "messages":
                chunk, _ = data
                if isinstance(chunk, AIMessageChunk) and chunk.text:
                    print(chunk.text, end="", flush=True)
            else:
                show_steps(data)
    except Exception as exc:  # DeepSeek unreachable, a bad key...: one line, not a traceback
        print(f"agent: error: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
