#!/usr/bin/env bash
# Creates .venv-peers/ at the repository root: LitServe, BentoML and Ray Serve at pinned versions, the load
# generator's clients, and Optic itself (editable), so every peer runs Optic's own decode/pre/post-processing.
# Kept apart from .venv: the peers bring their own web stacks, which must not leak into Optic's tests.
# Idempotent: does nothing when the pins have not changed since the last successful run.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${PEERS_VENV:-$ROOT/.venv-peers}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.installed-peers"
WANT="$(cat "$HERE/requirements.txt" "$HERE/constraints.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    exit 0
fi
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -c "$HERE/constraints.txt" -r "$HERE/requirements.txt" -e "$ROOT"
# Belt and braces: a CUDA torch would be gigabytes of something no peer here uses.
if "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('torch') else 1)" 2>/dev/null; then
    echo "setup_venv.sh: warning: torch was installed into $VENV by a dependency" >&2
fi
"$VENV/bin/python" -m pip check >&2 || echo "setup_venv.sh: warning: pip check reports conflicts (above)" >&2
echo "$WANT" > "$STAMP"
