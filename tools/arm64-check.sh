#!/usr/bin/env bash
# Build and test fastconv on ARM64 (AArch64) Linux from an x86-64 Linux machine, under emulation.
#
#   bash tools/arm64-check.sh [--prepare] [WORKDIR] [-- PYTEST-ARGS...]
#
# WORKDIR (default: ~/.cache/fastconv-arm64) keeps a Debian bookworm arm64 root file system, made once
# with debootstrap and qemu-user-static, its Python virtual environment and its pip cache, so that a
# later run only copies the repository in, reinstalls fastconv and runs the tests. Inside, the script
# installs the repository with `pip install ".[test]"` (the compiled extensions required), prints
# `fastconv info` and runs the kernel tests of both fast backends (or PYTEST-ARGS, test paths relative
# to the repository), then prints the date, the counts and the command. --prepare stops once the root
# file system and the environment's dependencies are in place.
#
# Needs root (debootstrap) and a Debian or Ubuntu host (the packages debootstrap, qemu-user-static and,
# where binfmt_misc does not run arm64 programs, proot are installed with apt-get when missing). Programs
# of the root file system run through chroot where the kernel's binfmt_misc hands arm64 programs to
# qemu (as qemu-user-static sets it up on a usual host), else through proot, which starts each one under
# qemu itself (containers, where binfmt_misc is not available). Emulation is slow: the first run takes
# about half an hour, a later one about 10 to 20 minutes, most of it compiling the extensions.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
prepare=0
workdir=""
pytest_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --prepare) prepare=1 ;;
        --) shift; pytest_args=("$@"); break ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) workdir="$1" ;;
    esac
    shift
done
workdir="${workdir:-${XDG_CACHE_HOME:-$HOME/.cache}/fastconv-arm64}"
mkdir -p "$workdir"
workdir="$(cd "$workdir" && pwd)"
root="$workdir/rootfs"
suite="bookworm"
mirror="${FASTCONV_ARM64_MIRROR:-http://deb.debian.org/debian}"
# what the root file system holds besides the base system
packages="python3,python3-venv,python3-dev,python3-pip,gcc,libc6-dev"
log="$workdir/last-run.log"

say() { printf '\n== %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
    echo "arm64-check: run as root (debootstrap and chroot need it)" >&2
    exit 2
fi
case "$(uname -m)" in
    aarch64|arm64) echo "arm64-check: this machine is ARM64 already: install and test natively" >&2; exit 2 ;;
esac

binfmt_runs_arm64() {
    [ -r /proc/sys/fs/binfmt_misc/qemu-aarch64 ] && head -n 1 /proc/sys/fs/binfmt_misc/qemu-aarch64 | grep -q enabled
}

# what the run sets up on this machine, undone at the end
mounted=()
binfmt_registered_here=0
# shellcheck disable=SC2317  # run by the trap
cleanup() {
    local i
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -R -l "${mounted[$i]}" 2> /dev/null || true; done
    if [ "$binfmt_registered_here" = 1 ]; then update-binfmts --disable qemu-aarch64 2> /dev/null || true; fi
}
trap cleanup EXIT

need=()
command -v debootstrap > /dev/null || need+=(debootstrap)
command -v qemu-aarch64-static > /dev/null || need+=(qemu-user-static)
if ! binfmt_runs_arm64 && ! command -v proot > /dev/null; then need+=(proot); fi
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]} on this machine"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" > /dev/null
fi
# qemu-user-static registers its binfmt entry where a service manager starts it, not in a container;
# there the script registers it for the run where binfmt_misc is mounted, and removes it at the end.
# Without it, proot starts the programs under qemu instead; but Debian 12's proot (5.1) passes the
# faccessat2 system call through with the host's paths, so gcc finds none of its own programs there.
if [ -z "${FASTCONV_ARM64_RUNNER:-}" ] && ! binfmt_runs_arm64 && [ -w /proc/sys/fs/binfmt_misc/register ] \
        && command -v update-binfmts > /dev/null && update-binfmts --enable qemu-aarch64 2> /dev/null \
        && binfmt_runs_arm64; then
    binfmt_registered_here=1
    echo "arm64-check: registered qemu-aarch64 with binfmt_misc for this run"
fi
if binfmt_runs_arm64; then runner=chroot; else runner=proot; fi
runner="${FASTCONV_ARM64_RUNNER:-$runner}"
if [ "$runner" = proot ]; then
    command -v proot > /dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq proot > /dev/null
    echo "arm64-check: binfmt_misc does not run arm64 programs here: using proot, under which gcc may not run" >&2
fi

# The guest reaches PyPI as this machine does: through the same proxy settings, trusting the same
# certificate authorities (a copy of this machine's bundle, which may hold a local proxy's own).
host_ca=""
for candidate in "${PIP_CERT:-}" "${REQUESTS_CA_BUNDLE:-}" "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt; do
    if [ -n "$candidate" ] && [ -f "$candidate" ]; then host_ca="$candidate"; break; fi
done
guest_ca=/etc/ssl/certs/fastconv-host-ca.crt
network_env=()
[ -n "$host_ca" ] && network_env+=("PIP_CERT=$guest_ca" "SSL_CERT_FILE=$guest_ca")
for variable in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY PIP_INDEX_URL PIP_DEFAULT_TIMEOUT; do
    [ -n "${!variable:-}" ] && network_env+=("$variable=${!variable}")
done

# guest COMMAND...: run COMMAND (a path inside the root file system) as root of the arm64 system
guest() {
    local env=(env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
               "FASTCONV_REQUIRE_EXTENSIONS=1" "FASTCONV_NUM_THREADS=${FASTCONV_NUM_THREADS:-2}"
               PIP_DISABLE_PIP_VERSION_CHECK=1 "${network_env[@]}")
    if [ -n "$host_ca" ] && [ -d "$root/etc/ssl/certs" ]; then cp "$host_ca" "$root$guest_ca"; fi
    if [ "$runner" = chroot ]; then
        "${env[@]}" chroot "$root" "$@"
    else
        "${env[@]}" proot -0 -q qemu-aarch64-static -r "$root" -b /dev -b /proc -b /sys \
            -b /etc/resolv.conf -w / "$@"
    fi
}

mount_for_chroot() {
    local fs
    if ! mountpoint -q "$root/proc"; then
        mount -t proc proc "$root/proc"
        mounted+=("$root/proc")
    fi
    for fs in sys dev; do  # unmounting them at the end leaves the host's mounts alone (rslave)
        if ! mountpoint -q "$root/$fs"; then
            mount --rbind "/$fs" "$root/$fs"
            mount --make-rslave "$root/$fs"
            mounted+=("$root/$fs")
        fi
    done
    cp /etc/resolv.conf "$root/etc/resolv.conf"
}

# the second stage removes /debootstrap when it is done
if [ -d "$root/debootstrap" ] || [ ! -x "$root/usr/bin/python3" ]; then
    if [ ! -x "$root/debootstrap/debootstrap" ]; then
        say "debootstrap, first stage: downloading Debian $suite arm64 ($packages) into $root"
        rm -rf "$root"
        debootstrap --arch=arm64 --foreign --variant=minbase --include="$packages" "$suite" "$root" "$mirror"
    fi
    # debootstrap may leave /proc a link to the host's; the guest needs a folder to mount or bind it on
    if [ -L "$root/proc" ]; then rm "$root/proc" && mkdir "$root/proc"; fi
    cp "$(command -v qemu-aarch64-static)" "$root/usr/bin/"
    say "debootstrap, second stage: unpacking and configuring under emulation ($runner), 10 to 20 minutes"
    [ "$runner" = chroot ] && mount_for_chroot
    guest /bin/sh -c 'DEBOOTSTRAP_DIR=/debootstrap exec /debootstrap/debootstrap --second-stage'
else
    [ "$runner" = chroot ] && mount_for_chroot
fi

machine() { guest /usr/bin/python3 -c 'import platform; print(platform.machine(), platform.python_version())'; }
say "the arm64 system runs: $(machine)"

if [ ! -x "$root/opt/venv/bin/python" ]; then
    say "creating the virtual environment /opt/venv inside"
    guest /usr/bin/python3 -m venv /opt/venv
    guest /opt/venv/bin/python -m pip install --quiet --upgrade pip
fi
# fastconv's dependencies, its build requirements and the test runner, as pyproject.toml lists them
dependencies="$(python3 - "$repo/pyproject.toml" << 'EOF'
import sys
try:
    import tomllib
except ImportError:  # Python before 3.11: the same lists, read plainly
    tomllib = None
text = open(sys.argv[1]).read()
if tomllib:
    data = tomllib.loads(text)
    names = data["project"]["dependencies"] + data["build-system"]["requires"]
else:
    import re
    names = re.findall(r'^\s*"([A-Za-z][^"]*)",', text, re.M)
print(" ".join(names + ["pytest", "hypothesis"]))
EOF
)"
say "installing the dependencies inside: $dependencies"
# shellcheck disable=SC2086
guest /opt/venv/bin/python -m pip install --quiet $dependencies
if [ "$prepare" = 1 ]; then
    say "prepared: $root (runner: $runner); run without --prepare to build and test fastconv there"
    exit 0
fi

say "copying the repository into /opt/fastconv inside"
rm -rf "$root/opt/fastconv"
mkdir -p "$root/opt/fastconv"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard) | (cd "$repo" && python3 -c '
import os, shutil, sys
target = sys.argv[1]
for path in sys.stdin.read().split("\0"):
    if path and os.path.isfile(path):
        os.makedirs(os.path.join(target, os.path.dirname(path)), exist_ok=True)
        shutil.copy2(path, os.path.join(target, path))
' "$root/opt/fastconv")

say "pip install \".[test]\" inside (the compiled extensions required: FASTCONV_REQUIRE_EXTENSIONS=1)"
start=$(date +%s)
guest /bin/sh -c 'cd /opt/fastconv && /opt/venv/bin/python -m pip install --quiet ".[test]"'
echo "built and installed in $(( $(date +%s) - start )) s"

say "fastconv info"
info="$(guest /bin/sh -c 'cd / && /opt/venv/bin/fastconv info')"
echo "$info"
for backend in cython numba; do
    if ! grep -Eq "^  [ *] $backend +available" <<< "$info"; then
        echo "arm64-check: the $backend backend is not available on arm64" >&2
        exit 1
    fi
done

if [ ${#pytest_args[@]} -eq 0 ]; then
    # the kernel tests of both fast backends, against the reference
    for test in tests/test_direct_kernels.py tests/test_kernels_hand.py tests/test_fused_relu.py \
                tests/test_validation.py; do
        [ -e "$repo/$test" ] && pytest_args+=("$test")
    done
    pytest_args=(-m "not slow" "${pytest_args[@]}")
fi
command="pytest -p no:cacheprovider ${pytest_args[*]}"
# the pytest script (not `python -m pytest`) leaves the current folder off sys.path: the tests import the
# installed fastconv, not the copy of the source tree
say "$command"
quoted="$(printf ' %q' "${pytest_args[@]}")"
start=$(date +%s)
set +e
guest /bin/sh -c "cd /opt/fastconv && /opt/venv/bin/pytest -p no:cacheprovider -q$quoted" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
counts="$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped)' "$log" | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')"

say "arm64 check"
echo "date:    $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "machine: $(machine) (Debian $suite under qemu-aarch64-static, $runner) on $(uname -m)"
echo "command: $command"
echo "counts:  ${counts:-none found (see $log)} in $(( $(date +%s) - start )) s"
exit "$status"
