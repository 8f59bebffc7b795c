"""Whether two run directories computed the same: every weights file and portion byte for byte,
and every evaluation result's scores (not its timings, paths or run keys).

    python benchmarks/same_outputs.py RUN_A RUN_B      # exit status 1 when anything differs

For checking that seed runs side by side give the sequential run's bytes on a whole run
(`DTM_SEEDS_SEQUENTIAL=1` against the default), e.g. `make demo` or a sweep; the test
(tests/test_side_by_side.py) does the same on a small lab run.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path


def outputs(root: Path) -> dict[str, str]:
    """Relative path -> sha256 (weights, portions) or the scores as JSON (evaluation results)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.suffix == ".safetensors" or (path.parent.name == "portions" and path.suffix == ".jsonl"):
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.parent.name == "eval" and path.suffix == ".json":
            result = json.loads(path.read_text())
            found[rel] = json.dumps({task: {k: r.get(k) for k in ("metrics", "groups", "counts", "per_item")}
                                     for task, r in sorted(result.items()) if isinstance(r, dict)}, sort_keys=True)
    return found


def main(argv: list[str]) -> int:
    a, b = (outputs(Path(p)) for p in argv[:2])
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    print(f"compared {len(a)} and {len(b)} outputs ({sum(k.endswith('.safetensors') for k in a)} weights files); "
          f"{len(differ)} differ" + (": " + ", ".join(differ[:8]) if differ else ""))
    return 1 if differ or not a else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
