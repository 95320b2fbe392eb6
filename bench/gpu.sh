#!/usr/bin/env bash
# dpkd against TRL on one GPU (bench/throughput.py --size gpt2: GPT-2 medium teaching GPT-2 small,
# bf16), the sampler against `generate` (bench/sampling.py), then the trainer tests on the GPU; about 7
# minutes on an H200 (2026-11-28), 9.5 at most (each part has its own time limit, so one that hangs leaves
# the others their time).
#
# For a machine with torch, transformers, accelerate, peft and pytest but without trl, datasets or
# rouge-score, and without network (the H200 machine). Fetch the wheels beforehand, with network, from the
# project root:
#     ../shared/tools/gpu-wheels.sh     # datasets, trl, rouge-score, nltk, transformers 5.24... into .whl/
# then on the GPU machine, from the project root (.whl/ is git-ignored: take it along explicitly):
#     bench/gpu.sh [WHEEL_DIR]          # or WHEELS=DIR; default: the first of .whl, shared/wheels, wheels
# What it prints also goes under $OUT when set (the device tool brings $OUT back), else runs/gpu-<time>/:
# env.txt (GPU, versions), throughput.md (the tables), throughput.json (rewritten after each configuration,
# so a run cut short keeps what it measured), sampling.md, tests.log, pip-dpkd.log.
# For a dry run elsewhere: SITE (where the wheels go, default /tmp/site), THROUGHPUT_ARGS (default
# "--size gpt2 --device cuda", the dpkd pairs first), SAMPLING_ARGS (default "--size gpt2 --device cuda --batch 16
# --new-tokens 128 --repeats 3"), TESTS (default: the trainer and precision test files) and
# TEST_DEVICE (default cuda) replace those parts.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu-$(date -u +%Y%m%dT%H%M%S)}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRL_EXPERIMENTAL_SILENCE=1

wheels=${1:-${WHEELS:-}}
if [ -z "$wheels" ]; then
  for dir in .whl shared/wheels wheels; do
    if [ -d "$dir" ]; then wheels=$dir; break; fi
  done
fi
if [ -z "$wheels" ] || ! ls "$wheels"/*.whl >/dev/null 2>&1; then
  echo "no wheels in ${wheels:-.whl, shared/wheels or wheels}; run ../shared/tools/gpu-wheels.sh first" >&2
  exit 2
fi

# The wheels go to a folder of their own, first on the path, as gpu-wheels.sh was checked with: --no-deps,
# since the machine has the rest and pip cannot fetch; its own transformers stays, shadowed by 5.24.
site=${SITE:-/tmp/site}
if ! timeout 90 "$py" -m pip install -q --no-index --find-links "$wheels" --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl; then
  echo "installing the wheels failed" >&2
  exit 3
fi
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
# dpkd itself, unless this checkout's is already the one imported; where pip may not write, the source tree
# on the path does the same.
if [ "$("$py" -c 'import dpkd; print(dpkd.__file__)' 2>/dev/null)" != "$PWD/src/dpkd/__init__.py" ] &&
  ! timeout 60 "$py" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    >"$out/pip-dpkd.log" 2>&1; then
  echo "pip install -e . failed (see pip-dpkd.log); using PYTHONPATH=src" >&2
  export PYTHONPATH=$PWD/src:$PYTHONPATH
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" - <<'PYTHON'
import sys

import datasets, dpkd, torch, transformers, trl

print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "trl", trl.__version__, "datasets", datasets.__version__)
print("dpkd from", dpkd.__file__, "; GPU visible to torch:", torch.cuda.is_available())
PYTHON
} 2>&1 | tee "$out/env.txt"

# About 5 minutes on an H200 (13 configurations, each in its own process: ~15 s to start, a compile of
# the decode step where dpkd samples (transformers' static-cache path; the compiled graphs are cached on
# disk for the next process), then 5 steps; 12 of them took 280 s on 2026-11-28). The dpkd pairs run
# first, so that a cut run keeps them. A child is stopped after 150 s, the whole benchmark after 360 s
# (timeout signals its process group).
# shellcheck disable=SC2086  # THROUGHPUT_ARGS, SAMPLING_ARGS and TESTS are word lists
default_pairs=dpkd_vs_distillation,jsd,kd,dpkd_token,jsd_onpolicy,dpkd_vs_gkd
timeout -k 10 360 "$py" bench/throughput.py ${THROUGHPUT_ARGS:---size gpt2 --device cuda --only $default_pairs} \
  --child-timeout 150 --json "$out/throughput.json" 2>&1 | tee "$out/throughput.md"
bench_status=$?

# The sampler alone, student and teacher, against plain `generate` with the dynamic cache (about 1 minute).
# shellcheck disable=SC2086
timeout -k 10 80 "$py" bench/sampling.py ${SAMPLING_ARGS:---size gpt2 --device cuda --batch 16 \
  --new-tokens 128 --repeats 3} 2>&1 | tee "$out/sampling.md"
sampling_status=$?

# The trainer tests on the GPU: conftest's make_config reads DPKD_TEST_DEVICE (tests that set use_cpu
# themselves stay on the CPU). Every failure is listed (-rf), none stops the run.
# shellcheck disable=SC2086
DPKD_TEST_DEVICE=${TEST_DEVICE:-cuda} timeout -k 10 80 "$py" -m pytest -q -rf -p no:cacheprovider \
  ${TESTS:-tests/test_precision.py tests/test_trainer_dpkd.py tests/test_trainer.py} 2>&1 | tee "$out/tests.log"
tests_status=$?

echo "throughput: exit $bench_status; sampling: exit $sampling_status; tests: exit $tests_status" \
  "(124: timed out); output in $out"
exit $((bench_status != 0 ? bench_status : sampling_status != 0 ? sampling_status : tests_status))
