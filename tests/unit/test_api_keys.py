"""Keys, their scopes and roles (api_keys.py), knowledge base names and the settings that
refuse a bad keys file at start-up, and what each path of the app belongs to (access.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from access import is_write, target_of, visible_schema
from api_keys import OPEN, Grant, load_keys
from settings import Settings

KBS = ["default", "hr", "eng"]


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def entry(name: str, key: str, kbs: list[str], role: str) -> str:
    return f'[[keys]]\nname = "{name}"\nsha256 = "{digest(key)}"\nkbs = {json.dumps(kbs)}\nrole = "{role}"\n'


def test_plain_and_hashed_keys_get_their_grants(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(entry("hr-bot", "s3cret", ["hr"], "read") + entry("ops", "op", ["*"], "admin"))
    ring = load_keys(["legacy"], str(keys), KBS)

    hr = ring.grant_for("s3cret")
    assert hr == Grant(name="hr-bot", role="read", kbs=frozenset({"hr"}))
    assert hr.may_read("hr") and not hr.may_read("eng") and not hr.may_read("default")
    assert not hr.may_write("hr") and not hr.is_admin
    ops = ring.grant_for("op")
    assert ops is not None and ops.is_admin and ops.may_write("eng") and ops.kbs is None
    legacy = ring.grant_for("legacy")
    assert legacy is not None and legacy.is_admin and legacy.may_write("hr")
    for wrong in ("", "s3cret ", "S3CRET", digest("s3cret"), "legacy2"):
        assert ring.grant_for(wrong) is None, wrong
    assert ring.required


def test_without_keys_every_request_may_do_everything() -> None:
    ring = load_keys([], "", KBS)
    assert not ring.required and ring.grant_for("") is OPEN and ring.grant_for("anything") is OPEN


def test_a_write_key_writes_only_its_knowledge_bases(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(
        json.dumps({"keys": [{"name": "w", "sha256": digest("w"), "kbs": ["hr", "eng"], "role": "write"}]})
    )
    grant = load_keys([], str(keys), KBS).grant_for("w")
    assert (
        grant is not None
        and grant.may_write("hr")
        and grant.may_write("eng")
        and not grant.may_write("default")
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "expected a list `keys`"),
        ("[[keys]\n", "is not valid TOML"),
        ('[[keys]]\nsha256 = "00"\n', "`name` is missing"),
        (entry("a", "k", ["hr"], "owner"), "`role` must be one of read, write, admin"),
        (entry("a", "k", [], "read"), "`kbs` must list knowledge bases"),
        (entry("a", "k", ["*", "hr"], "read"), 'either ["*"] or a list of names'),
        (entry("a", "k", ["payroll"], "read"), "no knowledge base 'payroll'; there are default, hr, eng"),
        (entry("a", "k", ["hr"], "admin"), 'an admin key sees every knowledge base: set kbs = ["*"]'),
        (
            entry("a", "k", ["hr"], "read").replace(digest("k"), "not-hex"),
            "`sha256` must be the key's SHA-256",
        ),
        (entry("a", "k", ["hr"], "read") + 'key = "k"\n', "unknown field 'key'"),
        (entry("a", "k", ["hr"], "read") + entry("a", "k2", ["hr"], "read"), "two keys are named 'a'"),
        (entry("a", "k", ["hr"], "read") + entry("b", "k", ["hr"], "read"), "the key 'b' is listed twice"),
        (entry("a", "legacy", ["hr"], "read"), "the key 'a' is listed twice"),
    ],
)
def test_a_bad_keys_file_says_what_is_wrong(tmp_path: Path, text: str, problem: str) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(text)
    with pytest.raises(ValueError) as refused:
        load_keys(["legacy"], str(keys), KBS)
    assert problem in str(refused.value)


def settings_problem(**values: Any) -> tuple[str, str]:
    with pytest.raises(ValidationError) as refused:
        Settings(_env_file=None, **values)
    error = refused.value.errors()[0]
    return str(error["loc"][0] if error["loc"] else ""), str(error["msg"])


def test_knowledge_base_names_become_collections_and_bad_ones_are_refused() -> None:
    settings = Settings(_env_file=None, RAG_COLLECTION="docs", RAG_KNOWLEDGE_BASES=" hr , eng_2 ")
    assert settings.knowledge_base_names == ["default", "hr", "eng_2"]
    assert [settings.collection_for(kb) for kb in settings.knowledge_base_names] == [
        "docs",
        "docs_hr",
        "docs_eng_2",
    ]
    assert settings.for_knowledge_base("hr").collection == "docs_hr"
    assert settings.for_knowledge_base("hr").knowledge_base_names == settings.knowledge_base_names
    assert Settings(_env_file=None).knowledge_base_names == ["default"]

    for bad in ("HR", "hr-docs", "a__b", "_hr", "hr_", "x" * 33, "hr/../x"):
        where, problem = settings_problem(RAG_KNOWLEDGE_BASES=f"eng,{bad}")
        assert where == "RAG_KNOWLEDGE_BASES" and "is not a knowledge base name" in problem, bad
    assert "the knowledge base of RAG_COLLECTION" in settings_problem(RAG_KNOWLEDGE_BASES="default")[1]
    assert "named twice" in settings_problem(RAG_KNOWLEDGE_BASES="hr,hr")[1]
    assert "at most 100" in settings_problem(RAG_KNOWLEDGE_BASES=",".join(f"kb{n}" for n in range(101)))[1]
    assert (
        "shorten RAG_COLLECTION"
        in settings_problem(RAG_COLLECTION="c" * 240, RAG_KNOWLEDGE_BASES="x" * 20)[1]
    )


def test_the_settings_read_the_keys_file_at_start_up(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(entry("hr-bot", "k", ["hr"], "read"))
    where, problem = settings_problem(RAG_KEYS_FILE=str(keys))  # hr is not declared
    assert where == "RAG_KEYS_FILE" and "no knowledge base 'hr'" in problem
    settings = Settings(_env_file=None, RAG_KNOWLEDGE_BASES="hr", RAG_KEYS_FILE=str(keys))
    assert settings.keys_required and settings.key_ring().grant_for("k") is not None
    assert "cannot read the keys file" in settings_problem(RAG_KEYS_FILE=str(tmp_path / "none.toml"))[1]
    assert not Settings(_env_file=None).keys_required


def test_each_path_belongs_to_a_knowledge_base_or_to_the_server() -> None:
    assert target_of("/kb/hr/rag/invoke") == target_of("/kb/hr/rag/invoke")
    assert (target_of("/kb/hr/rag/invoke").kb, target_of("/kb/hr/rag/invoke").rest) == ("hr", "/rag/invoke")
    assert target_of("/kb/hr").kb == "hr" and target_of("/kb/").kb == ""
    assert target_of("/rag/invoke").kb == "default" and target_of("/documents/x").kb == "default"
    assert target_of("/unknown/route").kb == "default"  # a route nobody listed is a knowledge base's
    for server_path in ("/metrics", "/openapi.json", "/docs", "/v1/models", "/v1/chat/completions"):
        assert target_of(server_path).kb is None
    assert is_write("POST", "/documents") and is_write("DELETE", "/documents/a.md")
    assert not is_write("GET", "/documents") and not is_write("POST", "/rag/invoke")


def test_the_api_docs_show_only_what_a_key_may_call() -> None:
    schema: dict[str, Any] = {
        "paths": {
            "/rag/invoke": {"post": {"tags": ["rag"], "$ref": "#/components/schemas/RagInput"}},
            "/kb/hr/rag/invoke": {
                "post": {"tags": ["kb/hr/rag"], "$ref": "#/components/schemas/kb_hr_ragInput"}
            },
            "/kb/eng/rag/invoke": {
                "post": {"tags": ["kb/eng/rag"], "$ref": "#/components/schemas/kb_eng_ragInput"}
            },
            "/health/details": {"get": {}},
            "/v1/models": {"get": {"$ref": "#/components/schemas/ModelList"}},
        },
        "components": {
            "schemas": {
                "RagInput": {},
                "kb_hr_ragInput": {"properties": {"q": {"$ref": "#/components/schemas/Question"}}},
                "kb_eng_ragInput": {},
                "Question": {},
                "ModelList": {},
            }
        },
        "tags": [{"name": "rag"}, {"name": "kb/hr/rag"}, {"name": "kb/eng/rag"}],
    }
    hr = visible_schema(schema, Grant("hr", "read", frozenset({"hr"})), KBS)
    assert set(hr["paths"]) == {"/kb/hr/rag/invoke", "/v1/models"}
    assert set(hr["components"]["schemas"]) == {"kb_hr_ragInput", "Question", "ModelList"}
    assert hr["tags"] == [{"name": "kb/hr/rag"}]
    assert set(visible_schema(schema, OPEN, KBS)["paths"]) == set(schema["paths"])
