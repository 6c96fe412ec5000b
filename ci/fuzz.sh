#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ for SECONDS_PER_TARGET seconds (default 60), one after the
# other on one core, then prints per target: runs, CPU seconds, crashes.
#
#   ci/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Each target starts from its committed seeds (fuzz/corpus/<target>) and from what earlier runs
# found (fuzz/target/fuzz-corpus/<target>, not committed); new inputs go to the latter. A crash
# stops its target: the input is in fuzz/artifacts/<target>/, and `cargo fuzz run <target>
# <file>` replays it (with the same --sanitizer). The exit status is 1 when any target crashed.
#
# Toolchain: `cargo +nightly` when there is one; otherwise the stable toolchain with
# RUSTC_BOOTSTRAP=1 (cargo-fuzz needs -Z flags); FUZZ_TOOLCHAIN=stable|nightly chooses.
# FUZZ_SANITIZER overrides the sanitizer (address by default; `none` is faster and finds only
# panics). FUZZ_TARGET_DIR puts the build elsewhere than fuzz/target.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true
[[ $seconds =~ ^[0-9]+$ ]] || { echo "usage: ci/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]" >&2; exit 2; }

command -v cargo-fuzz >/dev/null || cargo install --locked --quiet cargo-fuzz
toolchain=${FUZZ_TOOLCHAIN:-}
if [[ -z $toolchain ]]; then
    toolchain=stable
    cargo +nightly --version >/dev/null 2>&1 && toolchain=nightly
fi
if [[ $toolchain == nightly ]]; then
    fuzz=(cargo +nightly fuzz)
else
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo +stable fuzz)
    toolchain="stable with RUSTC_BOOTSTRAP=1"
fi
sanitizer=${FUZZ_SANITIZER:-address}
target_dir=${FUZZ_TARGET_DIR:-fuzz/target}
# Debug assertions on: an arithmetic overflow is a crash, not a silent wrap.
opts=(--sanitizer "$sanitizer" --debug-assertions --target-dir "$target_dir")

if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    mapfile -t targets < <("${fuzz[@]}" list)
fi
echo "fuzz: ${#targets[@]} targets, ${seconds}s each, $toolchain, sanitizer $sanitizer"
# Built before the clock starts: `cargo fuzz build` takes one target or all of them.
if [[ $# -gt 0 ]]; then
    for t in "${targets[@]}"; do "${fuzz[@]}" build "${opts[@]}" "$t"; done
else
    "${fuzz[@]}" build "${opts[@]}"
fi

bin_dir=$target_dir/$(rustc -vV | sed -n 's/^host: //p')/release
declare -A runs cpu crashes
failed=0
for t in "${targets[@]}"; do
    work=$target_dir/fuzz-corpus/$t
    mkdir -p "$work" "fuzz/corpus/$t" "fuzz/artifacts/$t"
    log=$target_dir/fuzz-$t.log
    before=$(find "fuzz/artifacts/$t" -type f | wc -l)
    TIMEFORMAT='%U %S'
    # Inputs may grow past libFuzzer's default 4 KiB where a bug needs more bytes than that
    # (hook output past the host's limit, a request of many descriptors and guest data).
    case $t in
        hook_output | virtio_request) extra=(-max_len=131072) ;;
        # Whole (small) disk images: the largest seed is 2 MiB.
        files_volume) extra=(-max_len=2200000) ;;
        *) extra=() ;;
    esac
    # libFuzzer: -timeout flags an input that takes longer than 10 s (a hang) as a crash.
    set +e
    # The built binary itself, as `cargo fuzz run` would start it, so that the CPU time is the
    # fuzzing's alone.
    { time ASAN_OPTIONS=${ASAN_OPTIONS:-detect_odr_violation=0} "$bin_dir/$t" \
        -artifact_prefix="fuzz/artifacts/$t/" -max_total_time="$seconds" -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1 "${extra[@]}" "$work" "fuzz/corpus/$t" \
        >"$log" 2>&1; } 2>"$target_dir/fuzz-$t.time"
    status=$?
    set -e
    read -r user sys <"$target_dir/fuzz-$t.time"
    cpu[$t]=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.1f", u + s }')
    runs[$t]=$(awk '/stat::number_of_executed_units/ { n = $2 } END { print n + 0 }' "$log")
    after=$(find "fuzz/artifacts/$t" -type f | wc -l)
    crashes[$t]=$((after - before))
    if [[ $status -ne 0 || ${crashes[$t]} -gt 0 ]]; then
        failed=1
        [[ ${crashes[$t]} -gt 0 ]] || crashes[$t]="failed (status $status)"
        echo "fuzz: $t: see $log" >&2
        grep -m1 -E "panicked at|ERROR: (libFuzzer|AddressSanitizer)" "$log" >&2 || tail -n 20 "$log" >&2
    fi
done

printf '\n%-18s %12s %10s  %s\n' target runs cpu-s crashes
total_cpu=0
for t in "${targets[@]}"; do
    printf '%-18s %12s %10s  %s\n' "$t" "${runs[$t]}" "${cpu[$t]}" "${crashes[$t]}"
    total_cpu=$(awk -v a="$total_cpu" -v b="${cpu[$t]}" 'BEGIN { print a + b }')
done
printf '%-18s %12s %10s\n' total "" "$total_cpu"
exit $failed
