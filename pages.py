"""The first page, `/`: what is ingested, and where to go from here (the playgrounds, the HTTP
docs, the OpenAI-compatible API), for each knowledge base the key may read. With API keys set
it asks for a key first and keeps it in a cookie, which the playgrounds' own requests then
carry: a browser cannot send a header."""

from __future__ import annotations

import html
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.requests import HTTPConnection

from api_keys import Grant, KeyRing
from errors import RagError
from settings import DEFAULT_KB, Settings

if TYPE_CHECKING:
    from service import RagService

log = logging.getLogger(__name__)

# The API key a browser signed in with on `/`. HttpOnly: no script reads it. SameSite=Lax:
# another site's form or script cannot make a browser POST to this service with it.
KEY_COOKIE = "rag_api_key"
# Open to anyone when API keys are set: the health check (which then says only the status),
# the page that asks for the key, and the sign-in.
OPEN_PATHS = frozenset({"/health", "/", "/login", "/logout"})
# Past this many, the source list starts folded.
SOURCES_SHOWN_OPEN = 30

STYLE = """
body { font: 16px/1.5 system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem;
       color: #1f2933; }
h1 { font-size: 1.6rem; margin-bottom: 0; } h2 { font-size: 1.15rem; margin-top: 2rem; }
.lead { color: #52606d; margin-top: .25rem; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .25rem 1rem; }
dt { color: #52606d; } dd { margin: 0; }
ul.sources { max-height: 20rem; overflow: auto; font-family: ui-monospace, monospace; font-size: .9rem; }
.problem { background: #fdecea; border: 1px solid #f5c2c0; padding: .5rem 1rem; border-radius: .5rem; }
code { background: #f0f4f8; padding: 0 .25rem; border-radius: .25rem; }
form.inline { display: inline; } button { font: inherit; }
"""


def page(title: str, body: str) -> HTMLResponse:
    """A whole HTML document around `body` (which is already escaped)."""
    document = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # No favicon request (and no 404 for it in the console).
        f'<link rel="icon" href="data:,"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>{body}</body></html>"
    )
    return HTMLResponse(document)


def presented_key(connection: HTTPConnection) -> str:
    """The API key a request carries: `Authorization: Bearer <key>`, or else the cookie of
    a browser that signed in on `/` ("" if neither)."""
    scheme, _, token = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return token.strip()
    return connection.cookies.get(KEY_COOKIE, "")


def sign_in_page(failed: bool) -> HTMLResponse:
    problem = '<p class="problem" role="alert">That key is not valid.</p>' if failed else ""
    body = f"""
<h1>milvus-deepseek-rag</h1>
<p class="lead">Answers from your documents, with citations.</p>
<h2>API key</h2>
<p>This server requires an API key. Enter one to use the
playgrounds and the HTTP docs in this browser; it is kept in a cookie for this site.
Programs send it as <code>Authorization: Bearer &lt;key&gt;</code> instead.</p>
{problem}
<form method="post" action="/login">
<label for="key">API key</label>
<input id="key" name="key" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Sign in</button>
</form>"""
    # 200 even after a wrong key: the page itself says so (a 401 document is a console error).
    return page("milvus-deepseek-rag: sign in", body)


def describe_llm(settings: Settings) -> str:
    if settings.llm_configured:
        models = ", ".join(f"<code>{html.escape(m)}</code>" for m in settings.model_list)
        return f"DeepSeek at <code>{html.escape(settings.deepseek_base_url)}</code>; models {models}"
    return (
        "none: <code>DEEPSEEK_API_KEY</code> is not set, so answers show the retrieved passages "
        "instead of a generated answer"
    )


def describe_store(stats: dict[str, Any] | None, problem: str | None, settings: Settings) -> str:
    """The "What is ingested" section."""
    rows = [("Milvus", f"<code>{html.escape(settings.milvus_uri)}</code>")]
    if stats is not None:
        rows += [
            ("Collection", f"<code>{html.escape(stats['collection'])}</code>"),
            ("Chunks", f'<span id="chunk-count">{stats["total_chunks"]}</span>'),
            ("Embedding model", html.escape(str(stats["embedding_model"]))),
        ]
    rows.append(("LLM", describe_llm(settings)))
    listing = "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in rows)
    parts = [f"<dl>{listing}</dl>"]
    if problem is not None:
        parts.append(f'<p class="problem" role="alert">{html.escape(problem)}</p>')
    elif stats is not None and not stats["sources"]:
        parts.append(
            '<p class="problem">Nothing is ingested yet. Run <code>rag ingest PATH</code> '
            "(files, folders, zips or URLs), then reload this page.</p>"
        )
    elif stats is not None:
        sources = "".join(f"<li>{html.escape(s)}</li>" for s in stats["sources"])
        opened = " open" if len(stats["sources"]) <= SOURCES_SHOWN_OPEN else ""
        parts.append(
            f"<details{opened}><summary>{len(stats['sources'])} sources</summary>"
            f'<ul class="sources">{sources}</ul></details>'
        )
    return "\n".join(parts)


def kb_prefix(kb: str) -> str:
    """Where a knowledge base's routes are: "" for the default one, /kb/{name} for the others."""
    return "" if kb == DEFAULT_KB else f"/kb/{kb}"


def describe_knowledge_bases(readable: dict[str, RagService], shown: str) -> str:
    """The "Knowledge bases" section: each one the key may read, with its playgrounds."""
    items = []
    for kb, service in readable.items():
        prefix = kb_prefix(kb)
        try:
            store = service.get_store()
            chunks = f"{store.count()} chunks" if store.exists() else "empty"
        except Exception as exc:  # one unreachable collection must not hide the others
            log.warning("the first page could not count knowledge base %s: %s", kb, exc)
            chunks = "not reachable"
        name = html.escape(kb)
        links = ", ".join(
            f'<a href="{prefix}/{route}/playground/">{label}</a>'
            for route, label in (("chat", "chat"), ("rag", "RAG"), ("retriever", "retriever"))
        )
        current = " (shown above)" if kb == shown else ""
        items.append(
            f'<li data-kb="{name}"><strong>{name}</strong>{current}: '
            f"<code>{html.escape(service.settings.collection)}</code>, {chunks}. Playgrounds: {links}; "
            f"OpenAI base URL <code>{prefix}/v1</code></li>"
        )
    return f"<ul>{''.join(items)}</ul>"


def home_page(
    readable: dict[str, RagService], signed_in: bool, grant: Grant, knowledge_bases: int
) -> HTMLResponse:
    """The page for the knowledge bases a key may read (the default one first, if it may);
    `knowledge_bases`: how many the server has (a list of them appears when there are several)."""
    from store.milvus import collection_stats

    kb, service = next(iter(readable.items()))
    prefix = kb_prefix(kb)
    settings = service.settings
    stats: dict[str, Any] | None = None
    problem: str | None = None
    try:
        stats = collection_stats(service.get_store())
    except RagError as exc:
        problem = str(exc)
    except Exception as exc:  # the connection broke after opening: the page still says why
        log.warning("the first page could not read the collection: %s", exc)
        problem = f"Milvus stopped answering: {exc}"
    sign_out = (
        '<form class="inline" method="post" action="/logout"><button type="submit">Sign out</button></form>'
        if signed_in
        else ""
    )
    health = (
        '<li><a href="/health/details">Health</a>: whether Milvus and the collection are reachable.</li>'
        if grant.is_admin
        else ""
    )
    named = f" <code>{html.escape(kb)}</code>" if knowledge_bases > 1 else ""
    listing = (
        f"<h2>Knowledge bases</h2>\n{describe_knowledge_bases(readable, kb)}" if knowledge_bases > 1 else ""
    )
    body = f"""
<h1>milvus-deepseek-rag</h1>
<p class="lead">Answers from your documents, with citations. {sign_out}</p>
<h2>Ask a question{named}</h2>
<ul>
<li><a href="{prefix}/chat/playground/">Chat playground</a>: a conversation; each answer comes with the
list of its sources.</li>
<li><a href="{prefix}/rag/playground/">RAG playground</a>: the chain's raw output (sources, answer,
usage) and its per-request settings: <code>k</code>, <code>search</code>, <code>source</code>,
<code>filter</code>, <code>model</code>, <code>temperature</code>, <code>thinking</code>.</li>
<li><a href="{prefix}/retriever/playground/">Retriever playground</a>: the passages a question finds,
without the LLM.</li>
</ul>
<h2>Call it from code</h2>
<ul>
<li><a href="/docs">HTTP API docs</a> (OpenAPI): <code>{prefix}/rag/invoke</code>,
<code>{prefix}/rag/stream</code>, <code>{prefix}/chat</code>, <code>{prefix}/retriever</code>,
or LangServe's <code>RemoteRunnable</code>.</li>
<li><a href="{prefix}/v1/models">OpenAI-compatible API</a>: any OpenAI client with the base URL
<code>{prefix}/v1</code> of this server.</li>
{health}
</ul>
<h2>What is ingested{named}</h2>
{describe_store(stats, problem, settings)}
{listing}"""
    return page("milvus-deepseek-rag", body)


def make_pages_router(services: dict[str, RagService], keys: KeyRing) -> APIRouter:
    """`/` (and, with API keys, `/login` and `/logout`) over the knowledge bases' services,
    the default one first."""
    router = APIRouter(include_in_schema=False)

    def page_for(grant: Grant, signed_in: bool) -> HTMLResponse:
        readable = {kb: service for kb, service in services.items() if grant.may_read(kb)}
        return home_page(readable, signed_in, grant, len(services))

    # A plain `def`: counting sources queries Milvus, which blocks; FastAPI runs it in a thread.
    @router.get("/", response_class=HTMLResponse)
    def index(request: Request, failed: bool = False) -> Response:
        grant = keys.grant_for(presented_key(request))
        if grant is None:
            return sign_in_page(failed)
        return page_for(grant, signed_in=keys.required)

    @router.post("/login")
    async def login(request: Request) -> Response:
        # One urlencoded field: the standard library parses it (Starlette's form parser would
        # need python-multipart, a dependency for this one field).
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        key = (form.get("key") or [""])[0].strip()
        if not keys.required or keys.grant_for(key) is None:
            log.info("sign-in with an invalid API key")
            return RedirectResponse("/?failed=1", status_code=303)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            KEY_COOKIE, key, httponly=True, samesite="lax", secure=request.url.scheme == "https"
        )
        return response

    @router.post("/logout")
    async def logout() -> Response:
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(KEY_COOKIE)
        return response

    return router
