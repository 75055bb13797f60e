"""The `rag` command: ingest, search, ask, serve, mcp, eval, stats. It parses, calls and prints."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from errors import InputError, RagError, SourceError
from settings import DEFAULT_KB, Settings, get_settings, import_pymilvus_safely

PROJECT_DOCS = Path(__file__).resolve().parent / "docs"
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 128 + 13  # SIGPIPE


def _service(settings: Settings, llm: Any = "auto") -> Any:
    from service import open_service

    return open_service(settings, llm=llm)


def _question(text: str | None, settings: Settings) -> str:
    if text is None or not text.strip():
        raise InputError("the question is empty")
    if len(text) > settings.max_question_chars:
        raise InputError(
            f"the question is {len(text)} characters long; the limit is "
            f"{settings.max_question_chars} (RAG_MAX_QUESTION_CHARS)"
        )
    return text.strip()


def cmd_ingest(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    """Ingest paths (default: the project's docs/)."""
    from loaders.formats import Limits
    from loaders.sources import is_url
    from store.indexing import ingest

    paths = args.paths or [str(PROJECT_DOCS)]
    missing = [p for p in paths if not is_url(p) and not Path(p).expanduser().exists()]
    if missing:
        raise SourceError(f"no such file or folder: {', '.join(missing)}")
    service = _service(settings, llm=None)
    try:
        report = ingest(
            paths,
            service.get_store(),
            service.chunker(),
            prune=args.prune,
            batch_size=settings.embedding_batch_size,
            progress=not args.json and not args.quiet,
            limits=Limits(
                max_bytes=int(args.max_mb * 1024 * 1024),
                max_pages=args.max_pages,
                seconds=args.file_timeout,
            ),
        )
    finally:
        service.close()
    if args.json:
        print(json.dumps(report.as_dict()), file=out)
    else:
        for skipped in report.skipped:
            print(f"skipped {skipped.path}: {skipped.reason}", file=sys.stderr)
        print(report.summary(), file=out)
    why = report.why_nothing()
    if why:
        print(f"rag: error: {why}", file=sys.stderr)
    return EXIT_ERROR if report.failed else 0


def _queries(args: argparse.Namespace) -> Iterator[str]:
    if args.query is not None:
        yield args.query
        return
    for line in sys.stdin:
        if line.strip():
            yield line.strip()


def cmd_search(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    """Retrieval only, for one query or one per line of standard input."""
    from loaders.markdown import citation

    service = _service(settings, llm=None)
    try:
        for query in _queries(args):
            query = _question(query, settings)
            documents = service.retriever.retrieve(
                query, k=args.k, search=args.mode, source_glob=args.source, expr=args.filter
            )
            results = [
                {
                    "text": d.page_content,
                    "source": d.metadata["source"],
                    "headers": d.metadata["headers"],
                    "page": d.metadata.get("page"),
                    "last_page": d.metadata.get("last_page"),
                    "score": round(d.metadata["score"], 4),
                }
                for d in documents
            ]
            if args.json:
                print(json.dumps({"query": query, "results": results}), file=out, flush=True)
                continue
            print(f"? {query}", file=out)
            if not results:
                print("  (no results: is anything ingested? try `rag ingest`)", file=out)
            for n, r in enumerate(results, start=1):
                where = citation(r["source"], r["headers"], r["page"], r["last_page"])
                print(f"[{n}] {r['score']:.3f}  {where}", file=out)
                snippet = " ".join(r["text"].split())[:200]
                print(f"    {snippet}", file=out)
            out.flush()
    finally:
        service.close()
    return 0


def cmd_ask(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    """Answer a question with sources, from the chain's stream (the one the server sends)."""
    from chains.rag import format_sources

    question = _question(args.question, settings)
    if args.model and args.model not in settings.model_list:
        raise InputError(f"unknown model {args.model!r}: choose one of {', '.join(settings.model_list)}")
    service = _service(settings)
    overrides = {
        "k": args.k,
        "search": args.mode,
        "source": args.source,
        "filter": args.filter,
        "model": args.model,
        "thinking": args.thinking or None,
    }
    chain = service.chain.with_config(configurable={k: v for k, v in overrides.items() if v is not None})
    live = not (args.json or args.no_stream)
    result: dict[str, Any] = {}
    try:
        for chunk in chain.stream({"question": question}):
            if live and chunk.get("reasoning"):
                sys.stderr.write(chunk["reasoning"])  # the thinking goes apart from the answer
                sys.stderr.flush()
            if live and chunk.get("answer"):
                if result.get("reasoning") and not result.get("answer"):
                    sys.stderr.write("\n\n")
                out.write(chunk["answer"])
                out.flush()
            for key, value in chunk.items():
                streamed = key in ("answer", "reasoning")
                result[key] = result.get(key, "") + value if streamed else value
    finally:
        service.close()
    if args.json:
        print(json.dumps(result), file=out)
        return 0
    if not live:
        if args.thinking and result.get("reasoning"):
            print(result["reasoning"] + "\n", file=sys.stderr)
        out.write(result.get("answer", ""))
    out.write("\n")
    if result.get("sources"):
        print("\nSources:\n" + format_sources(result["sources"]), file=out)
    if args.usage and result.get("usage"):
        print("usage: " + json.dumps(result["usage"]), file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    """Run the HTTP server: in this process, or in --workers N processes sharing one store."""
    host = args.host or settings.host
    port = args.port or settings.port
    if args.workers > 1:
        import workers

        print(
            f"serving on http://{host}:{port} with {args.workers} workers (open it in a browser)",
            file=out,
            flush=True,
        )
        workers.serve(settings, host, port, args.workers, out)
        return 0

    import uvicorn

    from observability import log_config
    from server import create_app

    print(f"serving on http://{host}:{port} (open it in a browser)", file=out, flush=True)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", log_config=log_config(settings))
    return 0


def cmd_mcp(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    """Serve the MCP tools over standard input and output, for desktop MCP hosts."""
    from mcp_server import serve_stdio

    serve_stdio(_service(settings))  # it closes the service when the host hangs up
    return 0


def cmd_stats(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    """What the collection holds."""
    from store.active import describe_active
    from store.milvus import collection_stats

    service = _service(settings, llm=None)
    try:
        store = service.get_store()
        stats = {"knowledge_base": args.kb, **collection_stats(store)}
        stats.update(describe_active(store.client, settings.collection, store.collection))
    finally:
        service.close()
    if len(settings.knowledge_base_names) > 1:
        stats["knowledge_bases"] = settings.knowledge_base_names
    if args.json:
        print(json.dumps(stats), file=out)
        return 0
    tune = stats.pop("tune", None)
    for key, value in stats.items():
        shown = value if not isinstance(value, list) else len(value)
        if key == "knowledge_bases":
            shown = ", ".join(value)
        print(f"{key:18} {shown}", file=out)
    for name, before in (tune or {}).get("before", {}).items():
        after = tune["after"].get(name, {})
        figures = ", ".join(
            f"{m} {before[m]:.3f} → {after.get(m, 0):.3f}" for m in ("hit@1", "hit@3", "mrr@10")
        )
        print(f"{'tuned on':18} {name} ({tune['search']}): {figures}", file=out)
    return 0


def cmd_eval(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    """Retrieval metrics on a JSONL file, per search mode, optionally against the naive baseline."""
    import tempfile

    from chains.evaluation import evaluate, format_table, load_rows
    from store.baseline import NaivePipeline

    rows = load_rows(args.file)
    modes = ["dense", "sparse", "hybrid"] if args.mode == "all" else [args.mode or settings.search]
    service = _service(settings, llm=None)
    results: dict[str, dict[str, Any]] = {}
    try:
        if not service.get_store().exists():
            raise InputError("the collection is empty: run `rag ingest PATH` first")
        if args.baseline:
            with tempfile.TemporaryDirectory() as folder:
                naive = NaivePipeline(service.embeddings, str(Path(folder) / "naive.db"))
                try:
                    naive.build(args.baseline)
                    results[f"naive ({naive.chunks} chunks)"] = evaluate(naive.retrieve, rows)
                finally:
                    naive.close()
        for mode in modes:

            def retrieve(query: str, depth: int, mode: str = mode) -> list[Any]:
                return service.retriever.retrieve(query, k=depth, search=mode)  # type: ignore[arg-type]

            results[mode] = evaluate(retrieve, rows)
    finally:
        service.close()
    if args.json:
        print(json.dumps(results), file=out)
    else:
        print(format_table(results), file=out)
        for name, metrics in results.items():
            if metrics["missed@3"]:
                print(f"{name}: not in top 3: {', '.join(metrics['missed@3'])}", file=out)
    return 0


def cmd_tune(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    """Fine-tune the embedding model on the collection, rebuild it beside the old one, switch."""
    if args.rollback:
        from service import rollback_collection

        left, now = rollback_collection(settings)
        if args.json:
            print(json.dumps({"collection": settings.collection, "from": left, "to": now}), file=out)
        else:
            print(f"rolled back: {settings.collection} is served by {now} again (was {left})", file=out)
        return 0
    from service import tune_collection
    from store.tuning import TuneConfig

    config = TuneConfig()
    for name in ("epochs", "batch_size", "max_pairs"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    writer = None
    if args.doc2query:
        if not settings.llm_configured:
            raise InputError("--doc2query writes questions with DeepSeek: set DEEPSEEK_API_KEY")
        from chains.doc2query import make_question_writer
        from chains.llm import make_llm

        writer = make_question_writer(make_llm(settings), settings, progress=not (args.json or args.quiet))
    report = tune_collection(
        settings,
        eval_file=args.eval,
        force=args.force,
        config=config,
        progress=not (args.json or args.quiet),
        question_writer=writer,
    )
    print(json.dumps(report.as_dict()) if args.json else report.summary(), file=out)
    return 0


def _kb_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kb",
        default=DEFAULT_KB,
        metavar="NAME",
        help=f"the knowledge base (one of RAG_KNOWLEDGE_BASES; default: {DEFAULT_KB}, RAG_COLLECTION)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for `rag`."""
    parser = argparse.ArgumentParser(
        prog="rag", description="Question answering over your documents with Milvus and DeepSeek."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ingest", help="load, split, embed and store documents")
    p.add_argument("paths", nargs="*", metavar="PATH", help="files, folders, .zip archives or URLs")
    p.add_argument("--prune", action="store_true", help="delete chunks of files gone from a root")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--max-mb", type=float, default=20.0, help="skip files larger than this")
    p.add_argument("--max-pages", type=int, default=2000, help="skip PDFs with more pages than this")
    p.add_argument("--file-timeout", type=float, default=120.0, help="seconds to read one PDF or DOCX file")
    _kb_option(p)
    p.set_defaults(handler=cmd_ingest)

    p = sub.add_parser("search", help="retrieve passages (no LLM)")
    p.add_argument("query", nargs="?", help="the query; reads one per line from stdin if absent")
    p.add_argument("-k", type=int, default=None, help="number of results")
    p.add_argument("--mode", choices=["hybrid", "dense", "sparse"], default=None)
    p.add_argument("--source", default=None, help="only sources matching this glob, e.g. 'faq/*'")
    p.add_argument("--filter", default=None, help="a Milvus filter expression")
    p.add_argument("--json", action="store_true", help="one JSON line per query")
    _kb_option(p)
    p.set_defaults(handler=cmd_search)

    p = sub.add_parser("ask", help="answer a question with citations")
    p.add_argument("question")
    p.add_argument("-k", type=int, default=None, help="passages given to the model")
    p.add_argument("--mode", choices=["hybrid", "dense", "sparse"], default=None)
    p.add_argument("--source", default=None, help="only sources matching this glob, e.g. 'faq/*'")
    p.add_argument("--filter", default=None, help="a Milvus filter expression")
    p.add_argument("--json", action="store_true", help="print the chain's output as JSON")
    p.add_argument("--no-stream", action="store_true", help="print the answer when complete")
    p.add_argument("--model", default=None, help="DeepSeek model id (one of DEEPSEEK_MODELS)")
    p.add_argument("--thinking", action="store_true", help="let the model reason first (to stderr)")
    p.add_argument("--usage", action="store_true", help="print token usage to stderr")
    _kb_option(p)
    p.set_defaults(handler=cmd_ask)

    p = sub.add_parser("serve", help="run the LangServe HTTP server")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    from workers import worker_count  # stdlib and settings only: cheap to import

    p.add_argument(
        "--workers",
        type=worker_count,
        default=1,
        metavar="N",
        help="worker processes (default 1); with a Milvus Lite file they share it through a "
        "`milvus-lite server` that rag starts and stops",
    )
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("mcp", help="serve the MCP tools over stdio, for desktop MCP hosts")
    _kb_option(p)
    p.set_defaults(handler=cmd_mcp)

    p = sub.add_parser("eval", help="retrieval metrics on a JSONL file of questions")
    p.add_argument("file", help="JSONL rows: question, source (file name), heading")
    p.add_argument("--mode", choices=["hybrid", "dense", "sparse", "all"], default=None)
    p.add_argument(
        "--baseline",
        nargs="+",
        metavar="PATH",
        default=None,
        help="also evaluate the tutorial's naive pipeline built from these paths",
    )
    p.add_argument("--json", action="store_true")
    _kb_option(p)
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser(
        "tune",
        help="fine-tune the embedding model on the collection and switch to it if not worse",
        description="Fine-tune the embedding model on pairs mined from the stored chunks, re-embed "
        "them into a new collection while the old one serves, compare the two on held-out pairs "
        "(and --eval questions), and switch only if the new one is not worse.",
    )
    p.add_argument("--eval", metavar="FILE", help="also compare on these questions (JSONL, as rag eval)")
    p.add_argument("--force", action="store_true", help="switch even if the tuned model scores worse")
    p.add_argument("--rollback", action="store_true", help="go back to the collection the last tune replaced")
    p.add_argument("--doc2query", action="store_true", help="add questions written by DeepSeek per chunk")
    p.add_argument("--epochs", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--max-pairs", type=int, default=None, help="train on at most this many pairs")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _kb_option(p)
    p.set_defaults(handler=cmd_tune)

    p = sub.add_parser("stats", help="what the collection holds")
    p.add_argument("--json", action="store_true")
    _kb_option(p)
    p.set_defaults(handler=cmd_stats)
    return parser


def _quiet_libraries() -> None:
    # Imported first: pymilvus sets its logger's level when it is imported.
    import_pymilvus_safely()
    for name in ("pymilvus", "milvus_lite", "grpc", "httpx", "sentence_transformers", "transformers"):
        # pymilvus logs a traceback for every failed RPC; we print one line instead.
        logging.getLogger(name).setLevel(logging.CRITICAL)


def main(
    argv: list[str] | None = None,
    settings_factory: Callable[[], Settings] = get_settings,
    out: TextIO | None = None,
) -> int:
    """Entry point of the `rag` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = out or sys.stdout
    _quiet_libraries()
    try:
        settings = settings_factory()
        if getattr(args, "kb", DEFAULT_KB) != DEFAULT_KB:
            settings = settings.for_knowledge_base(args.kb)
        return int(args.handler(args, settings, out))
    except RagError as exc:
        print(f"rag: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, InputError) else EXIT_ERROR
    except KeyboardInterrupt:
        print("rag: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader stopped reading (`rag search < questions | head`): end quietly, with the
        # status a shell gives a program killed by SIGPIPE, as other command-line tools do.
        if out is sys.stdout:
            # Python flushes stdout at exit, which would raise again: point it at /dev/null.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as exc:  # anything else: one line, not a traceback
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            fields = ", ".join(str(e["loc"][0]) for e in exc.errors() if e.get("loc"))
            where = f" ({fields})" if fields else ""
            print(f"rag: error: invalid configuration{where}: {exc.errors()[0]['msg']}", file=sys.stderr)
            return EXIT_USAGE
        print(f"rag: error: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
