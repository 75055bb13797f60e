"""API keys and what each may do: the plain keys of RAG_API_KEYS (every knowledge base, every
route) and the scoped keys of RAG_KEYS_FILE (some knowledge bases, a role). See
docs/deployment.md, "Knowledge bases and keys".

A keys file holds, per key, its name, the SHA-256 of the key (the key itself is never
stored), the knowledge bases it may use and its role:

    [[keys]]
    name = "hr-bot"
    sha256 = "9f2c..."        # printf %s "$KEY" | sha256sum
    kbs = ["hr"]              # or ["*"]: every knowledge base
    role = "read"             # read | write | admin

Roles: `read` asks and reads documents and jobs; `write` also uploads and deletes documents;
`admin` is the operator's (every knowledge base, /metrics in full, /health/details).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Role = Literal["read", "write", "admin"]
ROLES: tuple[Role, ...] = ("read", "write", "admin")
EVERY_KB = "*"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
ENTRY_FIELDS = {"name", "sha256", "kbs", "role"}


@dataclass(frozen=True)
class Grant:
    """What one key may do. `kbs` None: every knowledge base."""

    name: str
    role: Role
    kbs: frozenset[str] | None

    def may_read(self, kb: str) -> bool:
        """Ask questions of `kb` and read its documents and jobs."""
        return self.kbs is None or kb in self.kbs

    def may_write(self, kb: str) -> bool:
        """Upload documents to `kb` and delete them."""
        return self.role != "read" and self.may_read(kb)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


# Everything, for a server without keys (and for the keys of RAG_API_KEYS).
OPEN = Grant(name="anyone", role="admin", kbs=None)


def key_digest(key: str) -> str:
    """The SHA-256 of a key, in hex: what a keys file stores."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyRing:
    """Every accepted key and its grant."""

    plain: tuple[tuple[str, Grant], ...] = ()
    hashed: tuple[tuple[str, Grant], ...] = ()

    @property
    def required(self) -> bool:
        """Whether requests need a key at all (no keys configured: no authentication)."""
        return bool(self.plain or self.hashed)

    @property
    def grants(self) -> list[Grant]:
        return [grant for _, grant in self.plain + self.hashed]

    def grant_for(self, key: str) -> Grant | None:
        """The grant of `key`, or None for a missing or unknown key. Every entry is compared,
        in constant time, so the time taken does not say which entry came close."""
        if not self.required:
            return OPEN
        if not key:
            return None
        found: Grant | None = None
        encoded = key.encode()
        for known, grant in self.plain:
            if hmac.compare_digest(encoded, known.encode()):
                found = found or grant
        digest = key_digest(key).encode()
        for known, grant in self.hashed:
            if hmac.compare_digest(digest, known.encode()):
                found = found or grant
        return found


def load_keys(plain_keys: list[str], keys_file: str, knowledge_bases: list[str]) -> KeyRing:
    """The key ring of RAG_API_KEYS and RAG_KEYS_FILE; ValueError saying what is wrong."""
    plain = tuple(
        (key, Grant(name=f"RAG_API_KEYS #{n}", role="admin", kbs=None))
        for n, key in enumerate(plain_keys, start=1)
    )
    if not keys_file:
        return KeyRing(plain=plain)
    entries = _read_entries(Path(keys_file).expanduser())
    hashed: list[tuple[str, Grant]] = []
    names: set[str] = set()
    digests: set[str] = {key_digest(key) for key in plain_keys}
    for n, entry in enumerate(entries, start=1):
        digest, grant = _entry(entry, n, knowledge_bases)
        if grant.name in names:
            raise ValueError(f"{keys_file}: two keys are named {grant.name!r}")
        if digest in digests:
            raise ValueError(f"{keys_file}: the key {grant.name!r} is listed twice (same sha256)")
        names.add(grant.name)
        digests.add(digest)
        hashed.append((digest, grant))
    return KeyRing(plain=plain, hashed=tuple(hashed))


def _read_entries(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read the keys file {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
        raise ValueError(f"{path} is not valid {kind}: {exc}") from None
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a list `keys` of entries with name, sha256, kbs and role")
    return entries


def _entry(entry: Any, n: int, knowledge_bases: list[str]) -> tuple[str, Grant]:
    where = f"key #{n}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a table with name, sha256, kbs and role")
    name = entry.get("name")
    if isinstance(name, str) and name.strip():
        where = f"key {name!r}"
    else:
        raise ValueError(f"{where}: `name` is missing (a label for logs, not the key)")
    if unknown := set(entry) - ENTRY_FIELDS:
        raise ValueError(
            f"{where}: unknown field {sorted(unknown)[0]!r}; fields are {', '.join(sorted(ENTRY_FIELDS))}"
        )
    digest = entry.get("sha256")
    if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest.lower()):
        raise ValueError(f"{where}: `sha256` must be the key's SHA-256 in hex (printf %s KEY | sha256sum)")
    role = entry.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}: `role` must be one of {', '.join(ROLES)}")
    kbs = entry.get("kbs")
    if not isinstance(kbs, list) or not kbs or not all(isinstance(kb, str) for kb in kbs):
        raise ValueError(f'{where}: `kbs` must list knowledge bases, or be ["*"] for every one')
    if EVERY_KB in kbs:
        if len(kbs) > 1:
            raise ValueError(f'{where}: `kbs` is either ["*"] or a list of names, not both')
        scope = None
    else:
        if unknown_kbs := [kb for kb in kbs if kb not in knowledge_bases]:
            raise ValueError(
                f"{where}: no knowledge base {unknown_kbs[0]!r}; there are {', '.join(knowledge_bases)} "
                "(RAG_KNOWLEDGE_BASES)"
            )
        scope = frozenset(kbs)
    if role == "admin" and scope is not None:
        raise ValueError(f'{where}: an admin key sees every knowledge base: set kbs = ["*"]')
    return digest.lower(), Grant(name=name.strip(), role=role, kbs=scope)
