#!/bin/sh
# `make test`: the suite on both cores of a 2-core machine. Measured there (AMD EPYC, avx2 only), one
# test after another took 14-15 min, about one core busy; the tests that start a local multi-node Ray
# cluster (-m cluster) are a third of it and slow down 2-4x when anything else runs beside them (a
# re-run under load passed its 150 s deadline), so they run alone, first, followed by the browser tests
# and the tests that read the whole machine's CPU time (-m solo: a first search beside two busy processes
# once took past its 30 s wait; a worker beside /proc/stat counts as another process). Then, side by side:
#   - everything else on MMSEARCH_TEST_WORKERS (default 2) pytest-xdist workers, one file per worker at a
#     time (--dist loadfile: a file's module fixtures are built once);
#   - the training tests, in a fresh process of their own: after ONNX Runtime, OpenVINO, Ray and server
#     threads in one long-lived process, an in-process gloo step crashed pytest with SIGSEGV twice here.
# Every process shares one tiny encoder, trained by whichever needs it first (MMSEARCH_TEST_SHARE,
# tests/conftest.py). The training tests write to a log that is shown when they end.
# Usage: tests/run_suite.sh PYTHON [pytest args for every process]
set -u
PY=${1:?usage: tests/run_suite.sh PYTHON [pytest args]}
shift
share=$(mktemp -d)
trap 'rm -rf "$share"' EXIT
export MMSEARCH_TEST_SHARE="$share"
pytest() { "$PY" -m pytest -q "$@"; }

echo "== the Ray cluster and browser tests, alone =="
pytest tests -m "cluster or solo" --ignore-glob='tests/test_train*.py' --basetemp="$share/solo" "$@"
a=$?
echo "== the rest of the suite, with the training tests beside it =="
pytest tests/test_train*.py --basetemp="$share/train" "$@" >"$share/train.log" 2>&1 &
training=$!
pytest tests -m "not (cluster or solo)" --ignore-glob='tests/test_train*.py' -n "${MMSEARCH_TEST_WORKERS:-2}" \
    --dist loadfile --basetemp="$share/main" "$@"
b=$?
wait "$training"
c=$?
echo "== the training tests =="
cat "$share/train.log"
echo "== exit status: Ray cluster and browser tests $a, the rest $b, training $c =="
[ "$a" -eq 0 ] && [ "$b" -eq 0 ] && [ "$c" -eq 0 ]
