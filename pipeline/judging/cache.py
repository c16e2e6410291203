"""A persistent, crash-safe cache of LLM judge answers.

One small JSON file per answered request, ``<dir>/<key[:2]>/<key>.json``, written to a temporary
sibling, fsynced and renamed into place, so a process killed at any moment leaves either the whole
answer or nothing; a killed judge loses at most its requests in flight. Keys are content hashes
(:func:`cache_key`), so concurrent writers (parallel ``dvc exp`` runs sharing the directory) can only
ever write the same answer for the same key, and readers never see a partial file.

Only valid, parsed answers are stored. Failures (malformed answers after the retries, HTTP errors
after the client's retries) are not: a rerun asks again for exactly those.

Where the directory lives: :func:`pipeline.paths.resolve_cache_dir` with ``env_var=CACHE_ENV``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipeline.io import atomic_path, canonical_json

CACHE_ENV = "DPO_JUDGE_CACHE"  # overrides judge.llm.cache_dir when set
FORMAT = 1


def cache_key(material: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that determines the answer."""
    return hashlib.sha256(canonical_json({"cache_format": FORMAT, **material}).encode("utf-8")).hexdigest()


class JudgeCache:
    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)

    def _path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"not a cache key: {key!r}")
        return self.dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            rec = json.loads(self._path(key).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # unreadable or corrupt (e.g. edited by hand): ask again
            return None
        return rec if isinstance(rec, dict) and rec.get("key") == key and "answer" in rec else None

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def put(self, key: str, record: dict[str, Any]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = (json.dumps({**record, "key": key}, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
        with atomic_path(path, fsync=True) as tmp:
            tmp.write_bytes(data)

    def keys(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.stem for p in self.dir.glob("??/*.json"))
