#!/usr/bin/env bash
# Two revisions, the same benchmarks, one sitting: the figures a refactoring must
# keep (nightly, ingest, banner API, delivery). Each revision runs from its own git
# worktree (under $AB_DIR, default /tmp/kvadrupel-ab) with this checkout's .venv,
# its packages first on PYTHONPATH (workers and sandbox children inherit it), so
# each runs its own code and its own bench scripts.
#
#   flock /tmp/kvadrupel-bench.lock bench/ab.sh BEFORE_REV [AFTER_REV] [--quick] \
#       [--only nightly,ingest,api,delivery]
#
# Benchmarks alternate A, B, A, B per kind, so drift on a shared machine falls on
# both. --quick: smaller sizes (a few minutes in all). Output: each bench's own
# summary lines, labelled with the revision, then nothing else: read the ratios
# from the pairs. Needs PostgreSQL (scripts/services) and wrk for the API figures.
set -euo pipefail
cd "$(dirname "$0")/.."
before=${1:?usage: bench/ab.sh BEFORE_REV [AFTER_REV] [--quick]}
after=HEAD
quick=0
kinds="nightly ingest api delivery"
next_only=0
for a in "${@:2}"; do
    if [ "$next_only" = 1 ]; then kinds=${a//,/ }; next_only=0; continue; fi
    case "$a" in --quick) quick=1 ;; --only) next_only=1 ;; *) after=$a ;; esac
done
root=${AB_DIR:-/tmp/kvadrupel-ab}
py=$PWD/.venv/bin/python
mkdir -p "$root"
tree() {  # rev -> worktree path
    local dir="$root/$(git rev-parse --short "$1")"
    if [ ! -d "$dir" ]; then git worktree add --detach -f "$dir" "$1" >/dev/null 2>&1; fi
    ln -sfn "$PWD/.venv" "$dir/.venv"  # the benches start workers from .venv/bin
    echo "$dir"
}
A=$(tree "$before"); B=$(tree "$after")
if [ "$quick" = 1 ]; then
    nightly=(--users 200000 --workers 2 --cold-workers 2)
    ingest=(--events 200000 --users 50000 --workers 2)
    api=(--users 20000 --servers granian --seconds 8 --warmup 5)
    delivery=(--messages 2000 --rounds 2)
else
    nightly=(--users 1000000 --workers 2)
    ingest=(--events 1000000 --workers 2)
    api=(--users 100000 --servers granian --seconds 15 --warmup 20)
    delivery=(--messages 3000 --rounds 3)
fi
run() {  # label dir bench args...
    local label=$1 dir=$2 bench=$3; shift 3
    echo "=== $label $(git -C "$dir" rev-parse --short HEAD) $bench $*"
    (cd "$dir" && PYTHONPATH="$dir" "$py" "bench/$bench.py" "$@" 2>&1 | grep -v "^\s*$" | tail -25)
}
for kind in $kinds; do
    case $kind in
        nightly) args=("${nightly[@]}") ;;
        ingest) args=("${ingest[@]}") ;;
        api) args=("${api[@]}") ;;
        delivery) args=("${delivery[@]}") ;;
    esac
    run before "$A" "bench_$kind" "${args[@]}"
    run after "$B" "bench_$kind" "${args[@]}"
done
