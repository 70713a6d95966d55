#!/usr/bin/env bash
# Build and run tools/ctest/dconv_test.c (the direct-convolution kernels and the thread pool of
# fastconv/_ext, from C) for each target whose compiler, and whose runner, this machine has:
#
#   native        cc, run here
#   clang         clang, run here (the Clang paths of the kernels, as macOS builds them)
#   aarch64       aarch64-linux-gnu-gcc, run under qemu-aarch64(-static) (Linux on ARM64)
#   aarch64-clang clang --target=aarch64-linux-gnu, run the same way (Clang on ARM64, as on Apple silicon)
#   windows       x86_64-w64-mingw32-gcc (MinGW-w64: the Win32 thread pool, Windows' 64-bit ABI with its
#                 32-bit long), run under wine
#   windows-clang the variant files compiled by clang as clang-cl compiles them (_MSC_VER, no __GNUC__),
#                 linked by MinGW-w64 with the Win32 pool and the test, run under wine
#
#   bash tools/ctest/run.sh [TARGET...]     (default: all of them)
#
# On Debian or Ubuntu the tools come with
#   apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static mingw-w64 wine64 clang
# Prints what each target ran or why it was skipped; exits 1 when a target that ran failed.
# FASTCONV_CTEST_DIR keeps the programs (default: a temporary folder, removed at the end).
set -u

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
ext="$repo/fastconv/_ext"
targets=("$@")
all_targets=(native clang aarch64 aarch64-clang windows windows-clang)
[ ${#targets[@]} -eq 0 ] && targets=("${all_targets[@]}")

if [ -n "${FASTCONV_CTEST_DIR:-}" ]; then
    out="$FASTCONV_CTEST_DIR"
    mkdir -p "$out"
else
    out="$(mktemp -d)"
    trap 'rm -rf "$out"' EXIT
fi

test="$here/dconv_test.c"
variants=(dconv_dispatch dconv_avx512 dconv_avx2 dconv_generic)
kernel_sources=()
msvc_objects=()
for v in "${variants[@]}"; do
    kernel_sources+=("$ext/$v.c")
    msvc_objects+=("$out/msvc/$v.o")
done
# the flags setup.py compiles the extensions with (GCC and Clang), and the pool's threads
flags=(-O3 -ffp-contract=fast -std=gnu11 -Wall -Wno-unused-parameter -Wno-unused-function "-I$ext"
       -DFASTCONV_THREADS=1)

ran=()
skipped=()
failed=()
have() { command -v "$1" > /dev/null 2>&1; }

# run_target NAME BUILD-COMMAND... -- RUN-COMMAND...
run_target() {
    local name="$1" build=() run=()
    shift
    while [ "$1" != "--" ]; do build+=("$1"); shift; done
    shift
    run=("$@")
    printf '\n== %s\n$ %s\n' "$name" "${build[*]}"
    if ! "${build[@]}"; then
        failed+=("$name (build)")
        return
    fi
    printf '$ %s\n' "${run[*]}"
    if "${run[@]}"; then ran+=("$name"); else failed+=("$name"); fi
}

qemu=""
for candidate in qemu-aarch64-static qemu-aarch64; do
    if have "$candidate"; then qemu="$candidate"; break; fi
done
wine=""
for candidate in wine64 wine; do
    if have "$candidate"; then wine="$candidate"; break; fi
done
export WINEDEBUG="${WINEDEBUG:--all}"

for target in "${targets[@]}"; do
    case "$target" in
        native)
            cc="${CC:-cc}"
            if ! have "$cc"; then skipped+=("native (no $cc)"); continue; fi
            run_target native "$cc" "${flags[@]}" -pthread "$test" "${kernel_sources[@]}" "$ext/fc_pool.c" \
                -o "$out/dconv_test" -lm -- "$out/dconv_test"
            ;;
        clang)
            if ! have clang; then skipped+=("clang (no clang)"); continue; fi
            run_target clang clang "${flags[@]}" -pthread "$test" "${kernel_sources[@]}" "$ext/fc_pool.c" \
                -o "$out/dconv_test-clang" -lm -- "$out/dconv_test-clang"
            ;;
        aarch64|aarch64-clang)
            case "$(uname -m)" in
                aarch64|arm64) skipped+=("$target (this machine is AArch64: the native target runs it)"); continue ;;
            esac
            if [ "$target" = aarch64 ]; then
                compiler=(aarch64-linux-gnu-gcc)
                if ! have aarch64-linux-gnu-gcc; then
                    skipped+=("aarch64 (no aarch64-linux-gnu-gcc: apt-get install gcc-aarch64-linux-gnu)"); continue
                fi
            else
                compiler=(clang --target=aarch64-linux-gnu)
                if ! have clang || ! have aarch64-linux-gnu-gcc; then  # clang links with the GCC cross toolchain
                    skipped+=("aarch64-clang (needs clang and gcc-aarch64-linux-gnu)"); continue
                fi
            fi
            if [ -z "$qemu" ]; then
                skipped+=("$target (no qemu-aarch64-static or qemu-aarch64: apt-get install qemu-user-static)"); continue
            fi
            run_target "$target" "${compiler[@]}" "${flags[@]}" -pthread "$test" "${kernel_sources[@]}" \
                "$ext/fc_pool.c" -o "$out/dconv_test-$target" -lm \
                -- "$qemu" -L /usr/aarch64-linux-gnu "$out/dconv_test-$target"
            ;;
        windows)
            if ! have x86_64-w64-mingw32-gcc; then
                skipped+=("windows (no x86_64-w64-mingw32-gcc: apt-get install mingw-w64)"); continue
            fi
            if [ -z "$wine" ]; then skipped+=("windows (no wine: apt-get install wine64)"); continue; fi
            run_target windows x86_64-w64-mingw32-gcc "${flags[@]}" -D__USE_MINGW_ANSI_STDIO=1 -static "$test" \
                "${kernel_sources[@]}" "$ext/fc_pool.c" -o "$out/dconv_test.exe" -- "$wine" "$out/dconv_test.exe"
            ;;
        windows-clang)
            if ! have clang || ! have x86_64-w64-mingw32-gcc; then
                skipped+=("windows-clang (needs clang and x86_64-w64-mingw32-gcc)"); continue
            fi
            if [ -z "$wine" ]; then skipped+=("windows-clang (no wine: apt-get install wine64)"); continue; fi
            # clang as clang-cl runs it (the MSVC target: _MSC_VER, no __GNUC__), on the variant files, whose
            # only library headers are string.h, stddef.h, stdint.h and clang's own (a string.h for them here:
            # there are no MSVC headers on this machine); the objects are linked with MinGW-w64's C library
            mkdir -p "$out/msvc-include" "$out/msvc"
            printf '%s\n' '#pragma once' '#include <stddef.h>' 'void *memset(void *, int, size_t);' \
                'void *memcpy(void *, const void *, size_t);' > "$out/msvc-include/string.h"
            printf '\n== windows-clang: the variant files, compiled as clang-cl compiles them\n'
            ok=1
            for v in "${variants[@]}"; do
                printf '$ clang --target=x86_64-pc-windows-msvc ... -c %s.c\n' "$v"
                clang --target=x86_64-pc-windows-msvc -fms-extensions -fms-compatibility -ffreestanding \
                    "${flags[@]}" -isystem "$out/msvc-include" -c "$ext/$v.c" -o "$out/msvc/$v.o" || ok=0
            done
            if [ "$ok" = 0 ]; then failed+=("windows-clang (build)"); continue; fi
            run_target windows-clang x86_64-w64-mingw32-gcc "${flags[@]}" -D__USE_MINGW_ANSI_STDIO=1 -static \
                "$test" "$ext/fc_pool.c" "${msvc_objects[@]}" -o "$out/dconv_test-clang.exe" \
                -- "$wine" "$out/dconv_test-clang.exe"
            ;;
        *)
            echo "run.sh: unknown target $target (targets: ${all_targets[*]})" >&2
            exit 2
            ;;
    esac
done

printf '\n== summary\n'
[ ${#ran[@]} -gt 0 ] && printf 'passed:  %s\n' "${ran[*]}"
for s in "${skipped[@]+"${skipped[@]}"}"; do printf 'skipped: %s\n' "$s"; done
for f in "${failed[@]+"${failed[@]}"}"; do printf 'FAILED:  %s\n' "$f"; done
[ ${#failed[@]} -eq 0 ]
