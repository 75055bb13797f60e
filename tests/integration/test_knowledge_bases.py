"""Knowledge bases and scoped keys over real HTTP, against a real uvicorn, with the clients
people use: RemoteRunnable, the openai client, httpx and the MCP SDK's client.

Three knowledge bases (default, hr, eng), each holding one document with a marker of its own.
A key limited to hr must get hr's documents and nothing else, from every route: the matrix
below calls each route on its own knowledge base, on another one, on the default one, and
(for the routes that change documents) with a read key; a walk over every route of the app
proves that none of another knowledge base's routes answers.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import httpx2
import openai
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from langserve import RemoteRunnable
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from prometheus_client.parser import text_string_to_metric_families
from starlette.routing import Route

from access import target_of
from chains.llm import make_llm
from pages import OPEN_PATHS
from server import create_app
from service import open_knowledge_bases, open_service
from settings import DEFAULT_KB, Settings
from store.indexing import ingest
from tests.integration.conftest import serve_in_thread, with_llm
from tests.llm_server import LLMServer

pytestmark = pytest.mark.integration

# One document per knowledge base; each marker appears in its own document only.
DOCUMENTS = {
    DEFAULT_KB: ("office.md", "# Office\n\n## Wifi\n\nThe office wifi password changes every month.\n"),
    "hr": (
        "leave.md",
        "# Leave policy\n\n## Paid leave\n\nEvery employee gets 30 days of paid leave a year.\n",
    ),
    "eng": ("deploy.md", "# Deploy guide\n\n## Rollback\n\nRoll back a release with helm rollback.\n"),
}
MARKERS = {DEFAULT_KB: "wifi password", "hr": "30 days of paid leave", "eng": "helm rollback"}
QUESTION = "How many days of paid leave does an employee get?"
MODEL = "deepseek-v4-flash"

# name: (kbs, role); the keys themselves are "<name>-key".
SCOPED_KEYS = {
    "hr-read": (["hr"], "read"),
    "hr-write": (["hr"], "write"),
    "eng-write": (["eng"], "write"),
    "ops": (["*"], "admin"),
}
LEGACY = "legacy"  # a key of RAG_API_KEYS: every knowledge base, as before


def key(name: str) -> str:
    return f"{name}-key"


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key(name)}"}


def prefix(kb: str) -> str:
    return "" if kb == DEFAULT_KB else f"/kb/{kb}"


def keys_file(folder: Path) -> Path:
    entries = [
        f'[[keys]]\nname = "{name}"\nsha256 = "{hashlib.sha256(key(name).encode()).hexdigest()}"\n'
        f"kbs = {kbs!r}\nrole = {role!r}\n".replace("'", '"')
        for name, (kbs, role) in SCOPED_KEYS.items()
    ]
    path = folder / "keys.toml"
    path.write_text("\n".join(entries))
    return path


@dataclass
class Tenants:
    url: str
    app: FastAPI
    settings: Settings
    hr_job: str  # a job that uploaded into hr


@pytest.fixture(scope="module")
def tenants(
    tmp_path_factory: pytest.TempPathFactory, embeddings: Any, _llm_server: LLMServer
) -> Iterator[Tenants]:
    folder = tmp_path_factory.mktemp("tenants")
    settings = with_llm(
        Settings(
            _env_file=None,
            MILVUS_URI=str(folder / "store.db"),
            RAG_COLLECTION="tenants",
            RAG_KNOWLEDGE_BASES="hr,eng",
            RAG_KEYS_FILE=str(keys_file(folder)),
            RAG_API_KEYS=key(LEGACY),
        ),
        _llm_server,
    )
    services = open_knowledge_bases(settings, default=open_service(settings, llm=None, embeddings=embeddings))
    for kb, (name, text) in DOCUMENTS.items():
        (folder / kb).mkdir()
        (folder / kb / name).write_text(text)
        report = ingest([str(folder / kb)], services[kb].get_store(), services[kb].chunker(), progress=False)
        assert report.files == 1 and report.total_chunks >= 1, report
    for service in services.values():
        service.close()

    app = create_app(service=open_service(settings, llm=make_llm(settings), embeddings=embeddings))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        response = client.post(
            "/kb/hr/documents",
            files=[("files", ("benefits.md", b"# Benefits\n\nA 30 days of paid leave reminder.\n"))],
            headers=auth("hr-write"),
        )
        assert response.status_code == 202, response.text
        assert response.headers["location"] == f"/kb/hr/jobs/{response.json()['job_id']}"
        job = client.get(response.headers["location"], params={"wait": 60}, headers=auth("hr-write")).json()
        assert job["state"] == "done" and job["collection"] == "tenants_hr", job
        yield Tenants(url, app, settings, job["job_id"])


def leaked(text: str, own: str) -> list[str]:
    """The markers of other knowledge bases found in `text`."""
    return [kb for kb, marker in MARKERS.items() if kb != own and marker in text]


# ---------------------------------------------------------------------------- the matrix

Outcome = tuple[int, str]  # the HTTP status, and the text that came back (to look for leaks)


def status_of(error: BaseException) -> int:
    if isinstance(error, httpx.HTTPStatusError):
        return error.response.status_code
    if isinstance(error, openai.APIStatusError):
        return error.status_code
    raise error


async def remote(url: str, name: str, kb: str, route: str, value: Any) -> Outcome:
    runnable: RemoteRunnable = RemoteRunnable(f"{url}{prefix(kb)}/{route}/", headers=auth(name), timeout=60)
    try:
        return 200, str(await runnable.ainvoke(value))
    except httpx.HTTPStatusError as error:
        return status_of(error), error.response.text


async def rag_invoke(url: str, name: str, kb: str) -> Outcome:
    return await remote(url, name, kb, "rag", {"question": QUESTION})


async def rag_stream(url: str, name: str, kb: str) -> Outcome:
    runnable: RemoteRunnable = RemoteRunnable(f"{url}{prefix(kb)}/rag/", headers=auth(name), timeout=60)
    try:
        return 200, str([chunk async for chunk in runnable.astream({"question": QUESTION})])
    except httpx.HTTPStatusError as error:
        # A refused stream's body was not read: the same request again, without the client.
        stream = f"{prefix(kb)}/rag/stream"
        _, text = await http("POST", url, stream, name, json={"input": {"question": QUESTION}})
        return status_of(error), text


async def chat_invoke(url: str, name: str, kb: str) -> Outcome:
    return await remote(url, name, kb, "chat", {"question": QUESTION})


async def retriever_invoke(url: str, name: str, kb: str) -> Outcome:
    return await remote(url, name, kb, "retriever", QUESTION)


def openai_client(url: str, name: str, kb: str | None) -> openai.AsyncOpenAI:
    base = f"{url}{prefix(kb)}/v1" if kb is not None else f"{url}/v1"
    return openai.AsyncOpenAI(base_url=base, api_key=key(name), max_retries=0)


async def complete(url: str, name: str, base_kb: str | None, model: str) -> Outcome:
    """One chat completion through the openai client, its base URL that of `base_kb`."""
    async with openai_client(url, name, base_kb) as client:
        try:
            completion = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": QUESTION}]
            )
        except openai.APIStatusError as error:
            return error.status_code, error.response.text
    return 200, completion.model_dump_json()


async def openai_chat(url: str, name: str, kb: str) -> Outcome:
    """Any OpenAI client, with the knowledge base's base URL."""
    return await complete(url, name, kb, MODEL)


async def openai_alias(url: str, name: str, kb: str) -> Outcome:
    """One base URL for every knowledge base: the model `{kb}:{model}` names it."""
    return await complete(url, name, None, MODEL if kb == DEFAULT_KB else f"{kb}:{MODEL}")


async def openai_models(url: str, name: str, kb: str) -> Outcome:
    async with openai_client(url, name, kb) as client:
        try:
            models = [model.id async for model in client.models.list()]
        except openai.APIStatusError as error:
            return error.status_code, error.response.text
    return 200, str(models)


async def http(method: str, url: str, path: str, name: str, **kwargs: Any) -> Outcome:
    async with httpx.AsyncClient(base_url=url, headers=auth(name), timeout=60) as client:
        response = await client.request(method, path, **kwargs)
    return response.status_code, response.text


async def documents_list(url: str, name: str, kb: str) -> Outcome:
    return await http("GET", url, f"{prefix(kb)}/documents", name)


async def document_read(url: str, name: str, kb: str) -> Outcome:
    # hr's document, asked for under each knowledge base.
    return await http("GET", url, f"{prefix(kb)}/documents/leave.md", name)


async def upload(url: str, name: str, kb: str) -> Outcome:
    files = [("files", ("upload.md", b"# Upload\n\nAn upload of the matrix.\n"))]
    return await http("POST", url, f"{prefix(kb)}/documents", name, files=files)


async def delete(url: str, name: str, kb: str) -> Outcome:
    """Delete a document the operator put there first (it must survive a refused delete)."""
    path = f"{prefix(kb)}/documents"
    files = [("files", ("scratch.md", b"# Scratch\n\nTo be deleted.\n"))]
    status, text = await http("POST", url, path, "ops", files=files)
    assert status == 202, text
    job_id = httpx.Response(202, text=text).json()["job_id"]
    status, text = await http("GET", url, f"{prefix(kb)}/jobs/{job_id}", "ops", params={"wait": 60})
    assert '"state":"done"' in text, text
    outcome = await http("DELETE", url, f"{path}/scratch.md", name)
    status, text = await http("GET", url, f"{path}/scratch.md", "ops")
    assert (status == 404) == (outcome[0] == 200), "only a delete that was answered 200 deleted"
    return outcome


async def jobs_list(url: str, name: str, kb: str) -> Outcome:
    return await http("GET", url, f"{prefix(kb)}/jobs", name)


def job_read(hr_job: str) -> Callable[[str, str, str], Awaitable[Outcome]]:
    async def read(url: str, name: str, kb: str) -> Outcome:
        return await http("GET", url, f"{prefix(kb)}/jobs/{hr_job}", name)

    return read


async def mcp_tools(url: str, name: str, kb: str) -> Outcome:
    """The MCP SDK's client on the knowledge base's /mcp; a refusal is read from the same
    request made without the SDK (which reports it as an exception group)."""
    try:
        async with (
            httpx2.AsyncClient(headers=auth(name), timeout=60) as client,
            Client(
                streamable_http_client(f"{url}{prefix(kb)}/mcp", http_client=client), mode="legacy"
            ) as mcp,
        ):
            listed = await mcp.call_tool("list_sources", {})
            found = await mcp.call_tool("search_docs", {"query": QUESTION})
            answer = await mcp.call_tool("ask_docs", {"question": QUESTION})
    except BaseException:
        tools_list = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
        headers = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-06-18"}
        status, text = await http("POST", url, f"{prefix(kb)}/mcp", name, json=tools_list, headers=headers)
        assert status >= 400, "the SDK failed on a request that is answered"
        return status, text
    assert not (listed.is_error or found.is_error or answer.is_error)
    return 200, str([listed.structured_content, found.structured_content, answer.structured_content])


READS: dict[str, Callable[[str, str, str], Awaitable[Outcome]]] = {
    "rag invoke (RemoteRunnable)": rag_invoke,
    "rag stream (RemoteRunnable)": rag_stream,
    "chat invoke (RemoteRunnable)": chat_invoke,
    "retriever invoke (RemoteRunnable)": retriever_invoke,
    "chat completions, the knowledge base's /v1 (openai)": openai_chat,
    "chat completions, {kb}:{model} on the root /v1 (openai)": openai_alias,
    "models (openai)": openai_models,
    "list documents (httpx)": documents_list,
    "read a document (httpx)": document_read,
    "list jobs (httpx)": jobs_list,
    "MCP tools (MCP SDK)": mcp_tools,
}
WRITES: dict[str, Callable[[str, str, str], Awaitable[Outcome]]] = {
    "upload documents (httpx)": upload,
    "delete a document (httpx)": delete,
}
CASES = ["own knowledge base", "another knowledge base", "the default knowledge base"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("route", [*READS, "read a job (httpx)", *WRITES])
async def test_a_key_reaches_its_own_knowledge_base_and_no_other(
    tenants: Tenants, llm_server: LLMServer, route: str, case: str
) -> None:
    call = READS.get(route) or WRITES.get(route) or job_read(tenants.hr_job)
    name = "hr-write"  # may read and write hr, and nothing else
    kb = {"own knowledge base": "hr", "another knowledge base": "eng"}.get(case, DEFAULT_KB)
    status, text = await call(tenants.url, name, kb)
    root_v1 = kb == DEFAULT_KB and call in (openai_chat, openai_alias, openai_models)
    if call is openai_models and kb != "eng":  # the own /kb/hr/v1, or the root /v1 for every key
        own = [MODEL, "deepseek-v4-pro"] if kb == "hr" else [f"hr:{MODEL}", "hr:deepseek-v4-pro"]
        assert (status, text) == (200, str(own))
        return
    if kb == "hr":
        assert status in (200, 202), text
        assert not leaked(text, "hr"), f"{route} answered with another knowledge base's text: {text[:500]}"
        if route in READS and route not in ("models (openai)", "list jobs (httpx)"):
            assert MARKERS["hr"] in text or "leave.md" in text, text[:500]
        for request in llm_server.requests:  # what went into the prompt
            assert not leaked(str(request["body"]["messages"]), "hr")
        return
    assert status == 404, f"{route} on {kb}: {status} {text[:300]}"
    if call is openai_alias or root_v1:  # the root /v1: a model this key may not name
        assert "does not exist; available: hr:deepseek-v4-flash, hr:deepseek-v4-pro" in text, text
    else:  # the body of a knowledge base that does not exist
        assert f"no knowledge base '{kb}'" in text, text
    assert not leaked(text, "hr") and MARKERS["hr"] not in text
    assert llm_server.requests == [], "a refused request reached DeepSeek"


@pytest.mark.parametrize("route", WRITES)
async def test_a_read_key_may_not_upload_or_delete(tenants: Tenants, route: str) -> None:
    status, text = await WRITES[route](tenants.url, "hr-read", "hr")
    assert status == 403, text
    assert "may read the knowledge base 'hr' but not change it" in text
    # The same key reads hr; the refused delete left the operator's document in place (above).
    assert (await documents_list(tenants.url, "hr-read", "hr"))[0] == 200


def concrete(path: str) -> str:
    """A request path for a route template: each parameter filled in."""
    return re.sub(r"\{[^}]+\}", "x", path)


def routes_of(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path template) of every route of the app."""
    found = []
    for route in app.routes:
        if isinstance(route, APIRoute | Route):
            methods = route.methods or {"POST"}  # /mcp takes any method; POST is the protocol's
            found += [(method, route.path) for method in sorted(methods) if method != "HEAD"]
    return found


async def test_no_route_of_another_knowledge_base_answers(tenants: Tenants) -> None:
    routes = [(m, p) for m, p in routes_of(tenants.app) if p not in OPEN_PATHS]
    foreign = [(m, p) for m, p in routes if target_of(p).kb in ("eng", DEFAULT_KB)]
    own = {(m, p.removeprefix("/kb/hr")) for m, p in routes if target_of(p).kb == "hr"}
    # The same routes for each knowledge base (the default one's /v1 is the server's root /v1).
    assert {(m, p.removeprefix("/kb/eng")) for m, p in foreign if p.startswith("/kb/eng/")} == own
    assert {(m, p) for m, p in foreign if not p.startswith("/kb/")} == {r for r in own if "/v1/" not in r[1]}
    assert len(own) > 50
    async with httpx.AsyncClient(base_url=tenants.url, headers=auth("hr-write"), timeout=60) as client:
        for method, template in foreign:
            response = await client.request(method, concrete(template), json={})
            kb = target_of(template).kb
            assert response.status_code == 404, f"{method} {template}: {response.status_code}"
            body = response.json()
            reason = body["error"]["message"] if "error" in body else body["detail"]
            assert reason == f"no knowledge base '{kb}'", (method, template, body)
        # A knowledge base that does not exist reads the same.
        unknown = await client.get("/kb/payroll/documents")
        assert unknown.status_code == 404 and unknown.json() == {"detail": "no knowledge base 'payroll'"}


async def test_the_root_v1_lists_and_answers_only_the_keys_knowledge_bases(
    tenants: Tenants, llm_server: LLMServer
) -> None:
    async with openai_client(tenants.url, "hr-read", None) as client:
        hr_models = [model.id async for model in client.models.list()]
    async with openai_client(tenants.url, LEGACY, None) as client:
        every_model = [model.id async for model in client.models.list()]
    assert hr_models == [f"hr:{MODEL}", "hr:deepseek-v4-pro"]
    assert every_model == [MODEL, "deepseek-v4-pro", *hr_models, f"eng:{MODEL}", "eng:deepseek-v4-pro"]

    status, text = await openai_alias(tenants.url, "hr-read", "eng")
    assert status == 404 and "`eng:deepseek-v4-flash` does not exist; available: hr:" in text
    status, text = await openai_alias(tenants.url, "ops", "eng")
    assert status == 200 and MARKERS["eng"] in text and not leaked(text, "eng")
    assert '"model":"eng:deepseek-v4-flash"' in text
    assert llm_server.requests[-1]["body"]["model"] == MODEL  # DeepSeek is asked for the model itself


async def test_jobs_are_seen_only_under_their_own_knowledge_base(tenants: Tenants) -> None:
    hr_job = f"/jobs/{tenants.hr_job}"
    assert (await http("GET", tenants.url, f"/kb/hr{hr_job}", "hr-read"))[0] == 200
    # A key that may read eng, or every knowledge base, still finds hr's job only under hr.
    assert (await http("GET", tenants.url, f"/kb/eng{hr_job}", "eng-write"))[0] == 404
    assert (await http("GET", tenants.url, hr_job, "ops"))[0] == 404
    status, text = await http("GET", tenants.url, "/kb/eng/jobs", "eng-write")
    assert status == 200 and tenants.hr_job not in text
    status, text = await http("GET", tenants.url, "/kb/hr/jobs", "ops")
    assert status == 200 and tenants.hr_job in text and '"collection":"tenants_eng"' not in text


def scrape(url: str, name: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = httpx.get(f"{url}/metrics", headers=auth(name), timeout=60)
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


async def test_metrics_show_a_key_only_its_knowledge_bases(tenants: Tenants) -> None:
    await retriever_invoke(tenants.url, "eng-write", "eng")
    await retriever_invoke(tenants.url, "hr-read", "hr")
    hr = scrape(tenants.url, "hr-read")
    everything = scrape(tenants.url, "ops")

    assert hr and all(dict(labels).get("kb") == "hr" for _, labels in hr)
    assert ("rag_store_chunks", frozenset({("kb", "hr")})) in hr
    retrieved = ("rag_http_requests_total", frozenset({("method", "POST"), ("route", "/retriever/invoke")}))
    assert hr[(retrieved[0], retrieved[1] | {("status", "200"), ("kb", "hr")})] >= 1
    kbs = {dict(labels).get("kb") for _, labels in everything}
    assert {"hr", "eng", DEFAULT_KB} <= kbs
    assert everything[(retrieved[0], retrieved[1] | {("status", "200"), ("kb", "eng")})] >= 1
    # The process-wide figures (DeepSeek, retrieval) mix every knowledge base: the operator's.
    assert any(name.startswith("rag_retrieval_duration") for name, _ in everything)
    assert not any(name.startswith(("rag_retrieval", "rag_deepseek")) for name, _ in hr)


async def test_api_docs_and_health_details_follow_the_key(tenants: Tenants) -> None:
    async with httpx.AsyncClient(base_url=tenants.url, timeout=60) as client:
        hr = await client.get("/openapi.json", headers=auth("hr-read"))
        everything = await client.get("/openapi.json", headers=auth("ops"))
        docs = await client.get("/docs", headers=auth("hr-read"))
        details = await client.get("/health/details", headers=auth("hr-write"))
        operator = await client.get("/health/details", headers=auth(LEGACY))
    assert hr.status_code == everything.status_code == docs.status_code == 200
    assert "/openapi.json" in docs.text
    paths = cast(dict[str, Any], hr.json()["paths"])
    assert "/kb/hr/rag/invoke" in paths and "/kb/hr/documents" in paths and "/v1/models" in paths
    # No path, schema or tag of another knowledge base: its name appears nowhere.
    assert not re.search(r"(?<![A-Za-z])eng(?![a-z])", hr.text)
    assert "/rag/invoke" not in paths and "/health/details" not in paths
    assert {"/rag/invoke", "/kb/eng/rag/invoke", "/kb/hr/rag/invoke"} <= set(everything.json()["paths"])
    assert details.status_code == 403 and details.json() == {"detail": "/health/details needs an admin key"}
    assert operator.status_code == 200 and operator.json()["collection_name"] == "tenants"


async def test_the_mcp_tools_check_the_scope_themselves_wherever_they_are_mounted(tenants: Tenants) -> None:
    """Without the app's AccessMiddleware in front, `authorize` refuses a key of another
    knowledge base in the tool call itself."""
    from contextlib import asynccontextmanager

    from mcp_server import mount_mcp

    # The served app's own hr service: a client of the Lite file opened and closed here would
    # stop the Lite server that the app's clients share.
    service = tenants.app.state.services["hr"]

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        async with running():
            yield

    app = FastAPI(lifespan=lifespan)
    running = mount_mcp(app, service, tenants.settings, prefix="/kb/hr", kb="hr")
    results = {}
    with serve_in_thread(app) as url:
        for name in ("eng-write", "hr-read"):
            http = httpx2.AsyncClient(headers=auth(name), timeout=60)
            endpoint = streamable_http_client(f"{url}/kb/hr/mcp", http_client=http)
            async with http, Client(endpoint, mode="legacy") as mcp:
                results[name] = await mcp.call_tool("list_sources", {})
    refused, allowed = results["eng-write"], results["hr-read"]
    assert refused.is_error and "no knowledge base 'hr'" in str(refused.content)
    assert not allowed.is_error and "leave.md" in allowed.structured_content["sources"]  # type: ignore[index]


async def test_behind_a_root_path_the_check_sees_the_path_the_router_routes(tenants: Tenants) -> None:
    """Served under a prefix (`uvicorn --root-path /rag`), the request's path carries it; the
    router matches without it, and so must the check, or /rag/kb/eng/... would pass as the
    default knowledge base's."""
    transport = httpx.ASGITransport(app=tenants.app, root_path="/rag")
    async with httpx.AsyncClient(
        transport=transport, base_url="http://proxy", headers=auth("hr-write")
    ) as client:
        other = await client.get("/rag/kb/eng/documents")
        own = await client.get("/rag/kb/hr/documents")
        default = await client.get("/rag/documents")
        sign_in = await client.get("/rag/", headers={"Authorization": ""})
    assert other.status_code == 404 and other.json() == {"detail": "no knowledge base 'eng'"}
    assert own.status_code == 200 and "leave.md" in own.text
    assert default.status_code == 404 and default.json() == {"detail": "no knowledge base 'default'"}
    assert sign_in.status_code == 200 and "Sign in" in sign_in.text  # an open path, under the prefix too
