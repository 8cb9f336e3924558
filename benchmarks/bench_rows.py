"""What the tuning scripts share: their finished rows, nested by the keys that name them (a data set, a
setting, a draw), kept in OUT.json as each one finishes, so that a rerun skips the rows already there,
and their Markdown table in OUT.md. Imported by the scripts beside it, not run."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class Rows:
    """The rows of OUT.json (empty where there is none yet), and where their table goes."""

    def __init__(self, out: Path) -> None:
        self.json_path, self.md_path = out.with_suffix(".json"), out.with_suffix(".md")
        out.parent.mkdir(parents=True, exist_ok=True)  # before the first row is computed, not after
        self.rows: dict[str, Any] = json.loads(self.json_path.read_text()) if self.json_path.exists() else {}

    def ensure(
        self,
        keys: Sequence[str],
        compute: Callable[..., Any],
        *args: Any,
        shown: Callable[[Any], Any] = lambda row: row,
    ) -> Any:
        """The row under `keys`: where it is not there yet, `compute(*args)`, printed (what `shown` picks of
        it) and saved at once."""
        *path, last = keys
        level = self.rows
        for key in path:
            level = level.setdefault(key, {})
        if last not in level:
            level[last] = compute(*args)
            print(*keys, shown(level[last]), flush=True)
            self.json_path.write_text(json.dumps(self.rows, indent=1) + "\n")
        return level[last]

    def write_table(self, text: str) -> None:
        """OUT.md, also printed."""
        self.md_path.write_text(text)
        print(text)
