#!/usr/bin/env bash
# Runs fuzz targets (all, or those named) for FUZZ_SECONDS each (default
# 600), one after another, with the committed seeds plus whatever corpus
# earlier runs grew (fuzz/corpus/<target>/, git-ignored except seed-*).
# A crash stops that target: its input lands in fuzz/artifacts/<target>/,
# and the script exits 1 at the end. Needs the nightly toolchain and
# cargo-fuzz (`make fuzz` installs cargo-fuzz when missing).
# One summary line per target (runs, coverage, corpus) goes to stdout and
# to fuzz/logs/summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-600}
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
mkdir -p fuzz/logs
status=0
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    log=fuzz/logs/$t.log
    started=$(date -u +%FT%TZ)
    cargo +nightly fuzz run -O "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -timeout=20 -rss_limit_mb=4096 -print_final_stats=1 \
        >"$log" 2>&1
    rc=$?
    runs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -1)
    cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -1 | grep -Eo '[0-9]+')
    corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
    verdict=ok
    if [ $rc -ne 0 ]; then
        verdict="CRASH (rc $rc, see $log and fuzz/artifacts/$t/)"
        status=1
    fi
    line="$started $t: ${secs}s, ${runs:-?} runs, cov ${cov:-?}, corpus $corpus: $verdict"
    echo "$line" | tee -a fuzz/logs/summary.txt
done
exit $status
