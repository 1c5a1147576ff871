"""The state file of a reproduction: which steps are done, for which inputs, with what results.

A step's record carries a digest of everything its result depends on (the extraction: data, models, grid, dtype;
the search: also the seed, the held-out fraction and the search head; the scores: also the head). A rerun takes
a recorded result only when its digest matches, so a changed setting reruns exactly the steps it affects. The
file is replaced atomically after each step: a run killed at any point leaves the last finished step recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

STATE_FILE = "state.json"
_VERSION = 1


def digest(*parts) -> str:
    """A short hash of JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunState:
    """Read and update ``<output>/state.json``."""

    def __init__(self, folder):
        self.path = Path(folder) / STATE_FILE
        self.data = {"version": _VERSION, "dtype": None, "steps": {}}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"The state file {self.path} is unreadable ({exc}); delete it to start over (the "
                                 "feature store keeps every feature computed).") from exc
            if isinstance(data, dict) and data.get("version") == _VERSION:
                self.data = data

    @property
    def dtype(self) -> str | None:
        """The compute dtype the recorded extraction used."""
        return self.data.get("dtype")

    def result(self, step: str, step_digest: str):
        """The recorded result of ``step`` if it was recorded with ``step_digest``, else None."""
        record = self.data["steps"].get(step)
        return record["result"] if record is not None and record.get("digest") == step_digest else None

    def record(self, step: str, step_digest: str, result, **fields) -> None:
        """Record ``step`` as done, with its result (and top-level ``fields`` such as the dtype); write the file."""
        self.data["steps"][step] = {"digest": step_digest, "result": result}
        self.data.update(fields)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(self.data, indent=2))
        os.replace(temporary, self.path)  # readers see the old file or the new one, never half of one
