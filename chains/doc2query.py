"""doc2query for `rag tune --doc2query`: DeepSeek writes the questions each chunk answers.

Questions a user would ask are the closest training anchors to real queries; the offline
pairs (headings, titles, sentences) stay the default because they need no key. Questions
are kept in RAG_CACHE_DIR by chunk id (a hash of the chunk's content), so a second tune pays
only for new chunks, and an interrupted run keeps what it had written.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable
from tqdm import tqdm

from errors import LLMError
from settings import Settings

log = logging.getLogger(__name__)

QUESTIONS_PER_CHUNK = 3
# Chunks sent to DeepSeek at once.
CONCURRENCY = 8
PROMPT_VERSION = 1
QUESTION_PROMPT = ChatPromptTemplate.from_messages(
    [
        (
            "system",
            "You write the questions that a passage of technical documentation answers, as a user "
            "of the software would type them into a search box: short, in their own words, not "
            "copied from the passage. One question per line, no numbering, nothing else.",
        ),
        ("human", "Write {count} questions answered by this passage.\n\n{passage}"),
    ]
)
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s*")


def parse_questions(text: str, limit: int = QUESTIONS_PER_CHUNK) -> list[str]:
    """The questions in a reply: one per line, bullets and numbers removed, short lines dropped."""
    questions = []
    for line in text.splitlines():
        question = _BULLET.sub("", line).strip().strip('"')
        if len(question.split()) >= 3:
            questions.append(question)
    return questions[:limit]


def build_question_chain(llm: Runnable) -> Runnable:
    """{"passage", "count"} → a list of questions."""
    return QUESTION_PROMPT | llm | StrOutputParser() | parse_questions


def cache_file(settings: Settings) -> Path:
    """Where written questions are kept, per DeepSeek model and prompt version."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", settings.deepseek_model)
    return Path(settings.cache_dir).expanduser() / "doc2query" / f"{name}-v{PROMPT_VERSION}.jsonl"


def _read_cache(path: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                found[str(row["id"])] = [str(q) for q in row["questions"]]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by an interrupted run
    return found


def make_question_writer(
    llm: Runnable | None, settings: Settings, progress: bool = True
) -> Callable[[list[Document]], dict[str, list[str]]]:
    """A function from chunks to {chunk id: questions}, for store.tuning.mine_pairs."""
    if llm is None:
        raise LLMError("doc2query needs DeepSeek: set DEEPSEEK_API_KEY")
    chain = build_question_chain(llm)
    path = cache_file(settings)

    def write(chunks: list[Document]) -> dict[str, list[str]]:
        known = _read_cache(path)
        todo = [c for c in chunks if str(c.id) not in known]
        path.parent.mkdir(parents=True, exist_ok=True)
        failures: list[BaseException] = []
        bar = tqdm(
            total=len(todo),
            desc="tune: writing questions",
            unit="chunk",
            disable=not progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        with bar, path.open("a", encoding="utf-8") as sink:
            for start in range(0, len(todo), CONCURRENCY * 4):
                batch = todo[start : start + CONCURRENCY * 4]
                inputs = [{"passage": c.page_content, "count": QUESTIONS_PER_CHUNK} for c in batch]
                results: list[Any] = chain.batch(
                    inputs, config={"max_concurrency": CONCURRENCY}, return_exceptions=True
                )
                for chunk, result in zip(batch, results, strict=True):
                    if isinstance(result, BaseException):
                        failures.append(result)
                        continue
                    known[str(chunk.id)] = result
                    sink.write(json.dumps({"id": str(chunk.id), "questions": result}) + "\n")
                sink.flush()
                bar.update(len(batch))
        if todo and len(failures) == len(todo):
            raise LLMError(f"DeepSeek wrote no questions: {failures[0]}")
        if failures:
            log.warning("no questions for %d of %d chunks: %s", len(failures), len(todo), failures[0])
        return {str(c.id): known[str(c.id)] for c in chunks if str(c.id) in known}

    return write
