#!/usr/bin/env bash
# The long versions of the chaos and bad-input tests, run by hand (never by CI).
#
#   bench/soak/run.sh            # every case, about 5 minutes on 2 cores
#   bench/soak/run.sh promise    # only the tests whose name matches (pytest -k)
#
# The same tests as the suite, with sizes raised through SECUREMSG_CHAOS_* variables. Every
# test stays bounded: by its counts, by SECUREMSG_CHAOS_TIMEOUT seconds (pytest-timeout), and
# the whole run by `timeout`. Loopback only. Figures are appended to bench/soak/figures.jsonl
# (one JSON object a line; see docs/reliability.md), the seed of the random moments is printed.
set -euo pipefail
cd "$(dirname "$0")/../.."

export SECUREMSG_FIGURES=${SECUREMSG_FIGURES:-bench/soak/figures.jsonl}
export SECUREMSG_CHAOS_TIMEOUT=${SECUREMSG_CHAOS_TIMEOUT:-600}
export SECUREMSG_CHAOS_PROMISE_MESSAGES=${SECUREMSG_CHAOS_PROMISE_MESSAGES:-50000}
export SECUREMSG_CHAOS_PROMISE_CUTS=${SECUREMSG_CHAOS_PROMISE_CUTS:-200}
export SECUREMSG_CHAOS_STREAM_MESSAGES=${SECUREMSG_CHAOS_STREAM_MESSAGES:-200000}
export SECUREMSG_CHAOS_STREAM_CUTS=${SECUREMSG_CHAOS_STREAM_CUTS:-400}
export SECUREMSG_CHAOS_RESTART_CLIENTS=${SECUREMSG_CHAOS_RESTART_CLIENTS:-300}
export SECUREMSG_CHAOS_SHUTDOWN_PUBLISHERS=${SECUREMSG_CHAOS_SHUTDOWN_PUBLISHERS:-100}

selection=()
if [ $# -gt 0 ]; then
    selection=(-k "$1")
fi
log=$(mktemp /tmp/securemsg-soak-XXXXXX.log)
echo "+ figures go to $SECUREMSG_FIGURES, the whole output to $log"
status=0
timeout 3600 python -m pytest -p no:cacheprovider -q -s -rf --durations=0 \
    tests/integration/test_chaos.py tests/integration/test_bad_input.py "${selection[@]}" \
    > "$log" 2>&1 || status=$?
grep -E '^(FIGURE|SECUREMSG_CHAOS_SEED|FAILED)|^[0-9]+ (passed|failed)|s call ' "$log" || true
exit "$status"
