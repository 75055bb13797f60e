"""`rag tune`: the embedding model adapted to the stored corpus, and a collection built with it.

The stages, each callable on its own (service.tune_collection composes them with the
evaluation):

- `read_chunks(store)`: every stored chunk (text and metadata), read back from Milvus: the
  corpus is what the collection holds, whatever files it came from.
- `mine_pairs(chunks)`: training pairs from the documents' own structure (a heading and the
  text under it, a page title and its first section, a sentence and the rest of its chunk,
  optionally generated questions), with a held-out slice of sections for the before/after
  check. No labels, no evaluation questions.
- `train_model(...)`: sentence-transformers' trainer and in-batch-negatives loss, always
  from the base model (tuning twice never stacks), with a progress bar.
- `save_model(...)`: the weights under a name derived from their content in
  RAG_CACHE_DIR/models, with a record of the base model and the training data.
- `build_collection(...)`: every chunk re-embedded into a new collection while the old one
  keeps serving; `catch_up(...)` copies what an ingest changed meanwhile.

The switch itself (one alias change) and the collection records are in store/active.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from langchain_core.documents import Document
from tqdm import tqdm

from errors import EmbeddingError, InputError
from loaders.markdown import heading_path
from store.indexing import write_chunks
from store.milvus import PRIMARY_FIELD, TEXT_FIELD, RagStore

log = logging.getLogger(__name__)

MODELS_FOLDER = "models"
RECORD_FILE = "tune.json"
# Deepest headings found on this many pages or more ("Overview", "Example", "What's next")
# say nothing about their section on their own: their pairs use the heading path instead.
GENERIC_HEADING_PAGES = 3
# Sentences that make a pseudo-question: long enough to mean something, short like a question.
SPAN_WORDS = (6, 40)


@dataclass(frozen=True)
class Pair:
    """One training example: a query-like text and the passage it should retrieve."""

    anchor: str
    positive: str
    kind: str
    source: str
    headers: tuple[str, ...]


@dataclass
class MinedPairs:
    """Training pairs and the held-out ones, with counts for the record."""

    train: list[Pair]
    holdout: list[Pair]
    chunks: int
    sections: int

    def summary(self) -> dict[str, Any]:
        """What the training data was, for the model's record and the collection."""
        by_kind: dict[str, int] = defaultdict(int)
        for pair in self.train:
            by_kind[pair.kind] += 1
        return {
            "chunks": self.chunks,
            "sections": self.sections,
            "train_pairs": len(self.train),
            "pairs_by_kind": dict(sorted(by_kind.items())),
            "holdout_pairs": len(self.holdout),
        }


@dataclass
class TuneConfig:
    """How the model is trained. The defaults are the measured ones (docs/benchmarks.md)."""

    # Passes over the training pairs: enough for `target_passes` pair-passes, within these bounds.
    # A large corpus gets one (the time budget); no corpus more than two, as a small one
    # overfits its few pairs past that (docs/benchmarks.md).
    epochs: float | None = None
    min_epochs: float = 1.0
    max_epochs: float = 2.0
    target_passes: int = 4000
    batch_size: int = 32
    learning_rate: float = 3e-5
    # Passages are cut to this many tokens while training only (they are embedded whole).
    max_seq_length: int = 256
    # Held-out sentences (one per sampled chunk, never a training query) for the before/after check.
    holdout_share: float = 0.1
    min_holdout: int = 20
    max_holdout: int = 200
    # At most this many training pairs (0: all).
    max_pairs: int = 0
    seed: int = 0
    kinds: tuple[str, ...] = ("heading", "section", "question", "inline")
    # A heading or a bold line phrased as a question is the nearest thing to a user's question
    # that a corpus holds: its pair is repeated this many times.
    question_repeats: int = 3

    def epochs_for(self, pairs: int) -> float:
        """The epochs to train `pairs` pairs for."""
        if self.epochs is not None:
            return self.epochs
        wanted = self.target_passes / max(pairs, 1)
        return round(min(self.max_epochs, max(self.min_epochs, wanted)), 2)


def chunk_body(chunk: Document) -> str:
    """The chunk's text without the heading path the chunker put in front of it."""
    text = chunk.page_content
    headers = chunk.metadata.get("headers") or []
    prefix = heading_path(list(headers)) + "\n\n" if headers else ""
    return text[len(prefix) :] if prefix and text.startswith(prefix) else text


def scalar_fields(store: RagStore) -> list[str]:
    """The stored fields other than vectors (whatever this version's schema holds)."""
    from pymilvus import DataType

    vectors = {
        DataType.FLOAT_VECTOR,
        DataType.BINARY_VECTOR,
        DataType.FLOAT16_VECTOR,
        DataType.BFLOAT16_VECTOR,
        DataType.SPARSE_FLOAT_VECTOR,
    }
    info = store.client.describe_collection(store.collection)
    return [f["name"] for f in info.get("fields", []) if f.get("type") not in vectors]


def read_chunks(store: RagStore, batch_size: int = 1000) -> list[Document]:
    """Every stored chunk as a Document (`id` the primary key), in a stable order."""
    if not store.exists():
        return []
    fields = scalar_fields(store)
    iterator = store.client.query_iterator(
        store.collection, batch_size=batch_size, filter="", output_fields=fields
    )
    chunks = []
    try:
        while rows := iterator.next():
            for row in rows:
                metadata = {k: v for k, v in row.items() if k not in (PRIMARY_FIELD, TEXT_FIELD)}
                if "headers" in metadata:
                    metadata["headers"] = list(metadata["headers"] or [])
                chunks.append(
                    Document(id=row[PRIMARY_FIELD], page_content=row[TEXT_FIELD], metadata=metadata)
                )
    finally:
        iterator.close()
    chunks.sort(
        key=lambda d: (str(d.metadata.get("source", "")), d.metadata.get("chunk_index") or 0, d.id or "")
    )
    return chunks


def _sentences(text: str) -> list[str]:
    low, high = SPAN_WORDS
    parts = re.split(r"(?<=[.?!])\s+|\n+", text)
    return [
        p.strip() for p in parts if low <= len(p.split()) <= high and not p.strip().startswith(("|", "```"))
    ]


INLINE_QUESTION = re.compile(r"\*\*([^*\n]{10,200}\?)\*\*")


def is_question(text: str) -> bool:
    """Whether a heading is phrased as a question."""
    return text.rstrip().endswith("?")


def mine_pairs(
    chunks: list[Document],
    config: TuneConfig | None = None,
    generated: dict[str, list[str]] | None = None,
) -> MinedPairs:
    """Training pairs from the corpus's structure, and held-out sentences to check on.

    Kinds (config.kinds):
    - `heading`: a section's heading path → its first chunk, without the headings;
    - `section`: the same heading path → each later chunk of its section;
    - `question`: a heading phrased as a question → the same (repeated, see TuneConfig);
    - `inline`: a bold question inside a chunk (`**Can I ...?**`) → that chunk (repeated);
    - `subheading`: a specific deepest heading ("Range search", not "Overview") → the same;
    - `title`: a page's title → its first section;
    - `span`: one sentence of a chunk → the chunk without it;
    - `generated`: questions written for a chunk (doc2query, `generated` by chunk id) → the chunk.

    Held out: one sentence each from a seeded sample of chunks (a tenth, 20 to 200), scored
    by whether their section comes back; no training pair asks them.
    """
    config = config or TuneConfig()
    rng = random.Random(config.seed)
    # Document order: a page's first section first.
    ordered = sorted(
        chunks, key=lambda c: (str(c.metadata.get("source", "")), c.metadata.get("chunk_index") or 0)
    )
    sections: dict[tuple[str, tuple[str, ...]], list[Document]] = defaultdict(list)
    for chunk in ordered:
        key = (str(chunk.metadata.get("source", "")), tuple(chunk.metadata.get("headers") or []))
        sections[key].append(chunk)
    pages_with: dict[str, set[str]] = defaultdict(set)
    for source, headers in sections:
        if headers:
            pages_with[headers[-1].casefold()].add(source)
    generic = {h for h, pages in pages_with.items() if len(pages) >= GENERIC_HEADING_PAGES}

    sentences = {str(c.id): _sentences(chunk_body(c)) for c in ordered}
    # Held-out sentences are scored by their section's deepest heading: chunks with headings only.
    candidates = sorted(str(c.id) for c in ordered if sentences[str(c.id)] and c.metadata.get("headers"))
    size = max(config.min_holdout, int(len(chunks) * config.holdout_share))
    held = set(rng.sample(candidates, min(size, config.max_holdout, len(candidates))))
    holdout: list[Pair] = []
    pairs: list[Pair] = []
    repeats = max(1, config.question_repeats)
    titled: set[str] = set()
    for (source, headers), members in sections.items():
        first = members[0]
        body = chunk_body(first)
        if headers and body.strip():
            path = heading_path(list(headers))
            if "heading" in config.kinds:
                pairs.append(Pair(path, body, "heading", source, headers))
            if "question" in config.kinds and is_question(headers[-1]):
                pairs += [Pair(headers[-1], body, "question", source, headers)] * repeats
            if (
                "subheading" in config.kinds
                and len(headers) > 1
                and not is_question(headers[-1])
                and headers[-1].casefold() not in generic
            ):
                pairs.append(Pair(headers[-1], body, "subheading", source, headers))
            if "section" in config.kinds:
                # The heading path asks for the rest of its section too: a question about a
                # section's later chunk should find that chunk, not only the section's start.
                later_bodies = (chunk_body(later) for later in members[1:])
                pairs += [Pair(path, b, "section", source, headers) for b in later_bodies if b.strip()]
            if "title" in config.kinds and source not in titled:
                titled.add(source)
                # When the first section is the title's own text, the heading pair is this one.
                if len(headers) > 1:
                    pairs.append(Pair(headers[0], body, "title", source, headers))
        for chunk in members:
            pk = str(chunk.id)
            if "inline" in config.kinds:
                for match in INLINE_QUESTION.finditer(chunk.page_content):
                    pairs += [Pair(match.group(1), chunk_body(chunk), "inline", source, headers)] * repeats
            if pk in held:
                sentence = rng.choice(sentences[pk])
                holdout.append(Pair(sentence, chunk.page_content, "held-out", source, headers))
            elif "span" in config.kinds and sentences[pk]:
                sentence = rng.choice(sentences[pk])
                rest = chunk_body(chunk).replace(sentence, " ", 1)
                pairs.append(Pair(sentence, rest, "span", source, headers))
            for question in (generated or {}).get(pk, []):
                pairs.append(Pair(question, chunk_body(chunk), "generated", source, headers))
    # A held-out sentence is never a training query, wherever else it appears (copied pages).
    asked = {p.anchor for p in holdout}
    pairs = [p for p in pairs if p.anchor not in asked]
    rng.shuffle(pairs)
    if config.max_pairs and len(pairs) > config.max_pairs:
        pairs = pairs[: config.max_pairs]
    return MinedPairs(train=pairs, holdout=holdout, chunks=len(chunks), sections=len(sections))


def base_model_dir(model_dir: Path | None, spec: str) -> Path:
    """The base model's folder; tuning needs a sentence-transformers model on disk."""
    if model_dir is None or not (model_dir / "modules.json").is_file():
        raise InputError(
            f"RAG_EMBEDDING={spec!r} is not a sentence-transformers model folder: `rag tune` "
            "fine-tunes one (the default, 'minilm', is)"
        )
    return model_dir


class _ProgressBar:
    """A transformers TrainerCallback that drives one tqdm bar (steps, loss, time left)."""

    def __init__(self, enabled: bool, desc: str = "tune: training") -> None:
        self.enabled = enabled
        self.desc = desc
        self.bar: Any = None

    def callback(self) -> Any:
        from transformers import TrainerCallback

        owner = self

        class Callback(TrainerCallback):  # type: ignore[misc]
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                owner.bar = tqdm(
                    total=state.max_steps,
                    desc=owner.desc,
                    unit="step",
                    disable=not owner.enabled,
                    file=sys.stderr,
                    dynamic_ncols=True,
                )

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if owner.bar is not None:
                    owner.bar.update(1)

            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
                if owner.bar is not None and logs and "loss" in logs:
                    owner.bar.set_postfix_str(f"loss {logs['loss']:.3f}", refresh=False)

        return Callback()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def train_model(
    base_dir: Path,
    pairs: list[Pair],
    config: TuneConfig,
    work_dir: Path,
    progress: bool = True,
) -> Any:
    """A SentenceTransformer trained from `base_dir` on `pairs`.

    The loss is in-batch negatives both ways (MultipleNegativesSymmetricRankingLoss): each
    anchor against every passage of its batch, and each passage against every anchor.
    """
    if not pairs:
        raise InputError("no training pairs: the collection holds no sections with headings to learn from")
    import transformers
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesSymmetricRankingLoss
    from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.training_args import (
        SentenceTransformerTrainingArguments,
    )
    from transformers import PrinterCallback

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    model = SentenceTransformer(str(base_dir), device="cpu", local_files_only=True)
    inference_length = int(model.max_seq_length or config.max_seq_length)
    model.max_seq_length = min(config.max_seq_length, inference_length)
    dataset = Dataset.from_dict(
        {"anchor": [p.anchor for p in pairs], "positive": [p.positive for p in pairs]}
    )
    args = SentenceTransformerTrainingArguments(
        output_dir=str(work_dir),
        num_train_epochs=config.epochs_for(len(pairs)),
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        warmup_steps=0.1,
        save_strategy="no",
        report_to="none",
        logging_steps=5,
        use_cpu=True,
        disable_tqdm=True,
        seed=config.seed,
        # The same text twice in a batch would count as its own negative.
        batch_sampler=BatchSamplers.NO_DUPLICATES,
    )
    bar = _ProgressBar(progress)
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        loss=MultipleNegativesSymmetricRankingLoss(model),
        callbacks=[bar.callback()],
    )
    # It prints every log line to stdout when the trainer's own bar is off; ours shows the loss.
    trainer.remove_callback(PrinterCallback)
    try:
        trainer.train()
    finally:
        bar.close()
    model.max_seq_length = inference_length
    return model


def models_dir(cache_dir: Path) -> Path:
    """Where tuned models are kept."""
    return cache_dir / MODELS_FOLDER


def weights_digest(model_dir: Path) -> str:
    """SHA-256 of the model's weights file."""
    digest = hashlib.sha256()
    with (model_dir / "model.safetensors").open("rb") as weights:
        for block in iter(lambda: weights.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model(model: Any, cache_dir: Path, base_name: str, record: dict[str, Any]) -> Path:
    """Save under `<base>-tuned-<weights hash>` with `tune.json`; the same weights, the same folder."""
    folder = models_dir(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=folder))
    try:
        # No model card (a README of the training run): tune.json records what went into it.
        model.save(str(staging), create_model_card=False)
        name = f"{base_name}-tuned-{weights_digest(staging)[:12]}"
        (staging / RECORD_FILE).write_text(json.dumps({"name": name, **record}, indent=2) + "\n")
        target = folder / name
        if target.exists():
            shutil.rmtree(staging)  # identical weights were saved before: keep those
        else:
            os.replace(staging, target)
        return target
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def tuned_model_dir(cache_dir: Path, name: str) -> Path | None:
    """The folder of a tuned model by name, if this machine has it."""
    path = models_dir(cache_dir) / name
    return path if (path / "config.json").is_file() else None


def read_model_record(model_dir: Path) -> dict[str, Any]:
    """A tuned model's record (base model, training data); {} if it has none."""
    try:
        return dict(json.loads((model_dir / RECORD_FILE).read_text()))
    except (OSError, ValueError):
        return {}


def update_model_record(model_dir: Path, **values: Any) -> None:
    """Add fields to a tuned model's record."""
    record = read_model_record(model_dir)
    record.update(values)
    (model_dir / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")


def missing_model_error(collection: str, name: str, cache_dir: Path) -> EmbeddingError:
    """What to say when a collection's tuned model is not on this machine."""
    return EmbeddingError(
        f"collection {collection!r} was built with the tuned model {name!r}, which is not in "
        f"{models_dir(cache_dir)}: copy that folder there from the machine that ran `rag tune` "
        "(or set RAG_CACHE_DIR), or go back to the previous collection with `rag tune --rollback`"
    )


def write_in_batches(
    target: RagStore,
    chunks: list[Document],
    batch_size: int,
    progress: bool,
    desc: str = "tune: re-embedding",
) -> None:
    """Embed `chunks` with the target's model and store them under their own ids."""
    bar = tqdm(
        total=len(chunks), desc=desc, unit="chunk", disable=not progress, file=sys.stderr, dynamic_ncols=True
    )
    with bar:
        for start in range(0, len(chunks), batch_size):
            batch = chunks[start : start + batch_size]
            write_chunks(target, [(str(c.id), c) for c in batch])
            bar.update(len(batch))


def catch_up(source: RagStore, target: RagStore, batch_size: int, progress: bool = False) -> dict[str, int]:
    """Make the target hold the source's chunk ids again (an ingest may have run meanwhile)."""
    current = {str(c.id): c for c in read_chunks(source)}
    built = {str(c.id) for c in read_chunks(target)}
    added = [c for pk, c in current.items() if pk not in built]
    gone = sorted(built - set(current))
    if added:
        write_in_batches(target, added, batch_size, progress, desc="tune: catching up")
    for start in range(0, len(gone), 1000):
        target.client.delete(target.collection, ids=gone[start : start + 1000])
    if added or gone:
        target.flush()
    return {"added": len(added), "deleted": len(gone)}


@dataclass
class TrainingRecord:
    """What went into a tuned model (written to its tune.json and the collection)."""

    base_model: str
    collection: str
    created: str
    seconds: float
    config: dict[str, Any]
    data: dict[str, Any]
    generated_questions: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        data = asdict(self)
        data.update(data.pop("extra"))
        return data


def now() -> str:
    """The time, for records."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def timed(function: Callable[[], Any]) -> tuple[Any, float]:
    """function()'s result and the seconds it took."""
    started = time.perf_counter()
    return function(), time.perf_counter() - started


def as_rows(pairs: Iterable[Pair]) -> list[tuple[str, str, str]]:
    """(anchor, file name, deepest heading) of held-out pairs, shaped for the evaluation."""
    rows = []
    for pair in pairs:
        if pair.headers:
            rows.append((pair.anchor, Path(pair.source).name, pair.headers[-1]))
    return rows
