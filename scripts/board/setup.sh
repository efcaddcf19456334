#!/usr/bin/env bash
# Build the emulated Raspberry Pi (aarch64) board that `scripts/board/board.py` starts: user-mode QEMU
# over a Debian arm64 sysroot with the aarch64 TVM runtime, on an x86_64 Debian bookworm host.
#
#   bash scripts/board/setup.sh          # ~70 s the first time (plus host apt packages), ~1 s afterwards
#
# What it builds in $TVM_LOWBIT_BOARD_DIR (default: <repo>/.board, gitignored):
#   sysroot/          Debian bookworm arm64 python3.11 + libstdc++ and their dependencies, unpacked from
#                     Debian's .debs (no chroot, no binfmt_misc, no dpkg --add-architecture), plus the aarch64
#                     apache-tvm runtime, apache-tvm-ffi and numpy wheels at the host venv's versions
#                     and the aarch64 onnxruntime wheel (the int8 runtime that bench_arm.py compares against)
#   sysroot-<cpu>/    per emulated core (cortex-a72 = Pi 4, cortex-a76 = Pi 5): a hard-linked copy of sysroot/ with
#                     the /proc/cpuinfo that Pi shows (qemu-user reads absolute paths under -L first; ONNX
#                     Runtime's cpuinfo library segfaults on the host's x86 one and picks kernels by core part)
#   bin/python3       the board's Python: qemu-aarch64 -cpu $BOARD_CPU (default cortex-a72) over its sysroot
#   bin/board-exec    runs any aarch64 program on the board the same way
#   bin/isa_check     aarch64 probe: hwcaps, and whether SDOT (dotprod) runs or raises SIGILL
#   plugins/libicount.so  TCG plugin counting guest instructions per ELF file (scripts/board/src/icount.c)
#   board.env         paths, for shell scripts
# Every step is keyed on its inputs and skipped when they did not change. FORCE=1 rebuilds from scratch.
# Root is needed only to apt-get install the host packages (qemu-user, the aarch64 cross toolchain, gcc and
# dpkg-dev for the TCG plugin, whose header comes from the qemu source package, and llvm-19 for llvm-mca and
# llvm-mc, which tvm_lowbit.cost uses for the cycle estimate: its Neoverse N1 model times the Pi 5's A76).
#
# Knobs: TVM_LOWBIT_BOARD_DIR, HOST_PYTHON (python with pip; default the repo .venv), BOARD_PY_EXTRA
#        (more pinned board packages), ORT_VERSION (board onnxruntime; default the host venv's, else 1.32.0),
#        DEBIAN_SOURCES (deb822 file naming the Debian mirror), FORCE.
set -euo pipefail
shopt -s inherit_errexit

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
BOARD_DIR="${TVM_LOWBIT_BOARD_DIR:-$REPO/.board}"
HOST_PYTHON="${HOST_PYTHON:-$REPO/.venv/bin/python}"
[ -x "$HOST_PYTHON" ] || HOST_PYTHON=python3
DEBIAN_SOURCES="${DEBIAN_SOURCES:-/etc/apt/sources.list.d/debian.sources}"
BOARD_PY_EXTRA="${BOARD_PY_EXTRA:-psutil==7.2.2 cloudpickle==3.1.2}"
FORCE="${FORCE:-0}"
PYVER=3.11
ARM64_DEBS="python$PYVER libstdc++6"
HOST_PKGS=(qemu-user gcc libc6-dev dpkg-dev gcc-aarch64-linux-gnu g++-aarch64-linux-gnu ca-certificates llvm-19)
CPUS="cortex-a72 cortex-a76"

SYSROOT="$BOARD_DIR/sysroot"
SITE="$SYSROOT/usr/local/lib/python$PYVER/dist-packages"
STAMPS="$BOARD_DIR/.stamps"

log() { printf '[board setup] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
stamp_ok() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
stamp_set() { mkdir -p "$STAMPS"; printf '%s' "$2" > "$STAMPS/$1"; }

step() {  # step NAME FUNCTION: run it, print how long it took and what it did
    local t0 result
    t0=$(date +%s.%N)
    result=$("$2") || die "step '$1' failed (see the messages above)"
    printf '[board setup] %-14s %6.1f s  %s\n' "$1" "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{print b-a}')" \
        "${result:-done}" >&2
}

host_packages() {
    local missing=() p
    for p in "${HOST_PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then echo "present"; return; fi
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    log "apt-get install ${missing[*]}"
    $sudo apt-get update -qq >&2
    # no recommends: qemu-user would otherwise pull qemu-user-binfmt, a host-wide change we do not want
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    echo "installed ${missing[*]}"
}

# A private apt (own config, lists, cache, empty dpkg status) so that arm64 or source packages can be
# downloaded without touching the host's dpkg architecture list or package state.
private_apt() {  # private_apt DIR ARCH deb|deb-src
    local d=$1
    mkdir -p "$d/sources" "$d/lists/partial" "$d/cache/archives/partial" "$d/conf.d"
    : > "$d/status"
    [ -f "$DEBIAN_SOURCES" ] || die "no $DEBIAN_SOURCES: set DEBIAN_SOURCES to a deb822 file naming a Debian bookworm mirror"
    sed -e "s/^Types:.*/Types: $3/" -e '/^Architectures:/d' "$DEBIAN_SOURCES" > "$d/sources/debian.sources"
    cat > "$d/apt.conf" <<EOF
APT::Architecture "$2";
APT::Architectures { "$2"; };
APT::Install-Recommends "false";
APT::Sandbox::User "root";
Dir::Etc::SourceList "/dev/null";
Dir::Etc::SourceParts "$d/sources";
Dir::Etc::Preferences "/dev/null";
Dir::Etc::PreferencesParts "$d/conf.d";
Dir::Etc::Parts "$d/conf.d";
Dir::State::Lists "$d/lists";
Dir::State::status "$d/status";
Dir::Cache "$d/cache";
EOF
}

arm64_debs() {
    local d="$BOARD_DIR/apt-arm64" key
    key="$ARM64_DEBS|$(md5sum < "$DEBIAN_SOURCES" | cut -c1-12)"
    if stamp_ok arm64_debs "$key" && compgen -G "$d/cache/archives/*.deb" >/dev/null; then echo "cached"; return; fi
    private_apt "$d" arm64 deb
    APT_CONFIG="$d/apt.conf" apt-get update -qq >&2
    # the empty dpkg status makes apt download the whole dependency closure
    # shellcheck disable=SC2086
    APT_CONFIG="$d/apt.conf" apt-get install -d -y -qq $ARM64_DEBS >&2
    rm -rf "$d"/lists/*_* "$d"/cache/*.bin  # ~170 MB of package indexes, not needed again
    stamp_set arm64_debs "$key"
    echo "$(compgen -G "$d/cache/archives/*.deb" | wc -l) debs"
}

sysroot() {
    local debs key tmp f
    debs=$(compgen -G "$BOARD_DIR/apt-arm64/cache/archives/*.deb" | sort)
    key=$(printf '%s\n' "$debs" | xargs -n1 basename | md5sum | cut -c1-16)
    if stamp_ok sysroot "$key" && [ -x "$SYSROOT/usr/bin/python$PYVER" ]; then echo "up to date"; return; fi
    tmp="$SYSROOT.tmp"
    rm -rf "$tmp"
    # merged /usr as on a real bookworm install; otherwise Python's prefix search under qemu -L can fall
    # through to the host's /lib/python3.11
    mkdir -p "$tmp/usr/bin" "$tmp/usr/sbin" "$tmp/usr/lib"
    ln -s usr/bin "$tmp/bin"; ln -s usr/sbin "$tmp/sbin"; ln -s usr/lib "$tmp/lib"
    for f in $debs; do
        dpkg-deb --fsys-tarfile "$f" | tar -x --keep-directory-symlink -C "$tmp"
    done
    rm -rf "$tmp"/usr/share/{doc,man,info,locale,lintian}
    ln -sf "python$PYVER" "$tmp/usr/bin/python3"
    # qemu -L falls back to host paths that are missing in the sysroot: shadow the ones that matter
    : > "$tmp/etc/ld.so.cache"  # the host's x86 loader cache
    mkdir -p "$tmp/usr/local/lib/python$PYVER/dist-packages" "$tmp/usr/lib/python3/dist-packages"  # host x86 packages
    rm -rf "$SYSROOT"; mv "$tmp" "$SYSROOT"
    rm -f "$STAMPS/board_pip" "$STAMPS/warmup"
    stamp_set sysroot "$key"
    echo "$(printf '%s\n' "$debs" | wc -l) debs, $(du -sh "$SYSROOT" | cut -f1)"
}

board_pip() {
    local versions key
    # the board runs the same TVM runtime (and numpy) as the host compiler
    versions=$("$HOST_PYTHON" -c 'from importlib.metadata import version as v
print(" ".join(f"{p}=={v(p)}" for p in ("apache-tvm", "apache-tvm-ffi", "numpy")))') \
        || die "$HOST_PYTHON has no apache-tvm: run scripts/setup.sh first"
    key="$versions $BOARD_PY_EXTRA"
    if stamp_ok board_pip "$key" && [ -f "$SITE/tvm/lib/libtvm_runtime.so" ]; then echo "installed"; return; fi
    rm -rf "$SITE"; mkdir -p "$SITE"
    # shellcheck disable=SC2086
    PIP_CACHE_DIR="$BOARD_DIR/cache/pip" "$HOST_PYTHON" -m pip install --no-input --disable-pip-version-check -q \
        --target "$SITE" --only-binary=:all: --no-compile --platform manylinux_2_28_aarch64 \
        --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 --python-version "$PYVER" \
        --implementation cp --abi "cp${PYVER/./}" $versions $BOARD_PY_EXTRA 2>&1 \
        | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
    [ -f "$SITE/tvm/lib/libtvm_runtime.so" ] || die "pip did not install the aarch64 TVM runtime into $SITE"
    # a deployed board needs only the runtime; without the 240 MB compiler library `import tvm` is
    # runtime-only, which is 3-5x faster under emulation
    rm -rf "$SITE/tvm/lib/libtvm_compiler.so" "$SITE/tvm/3rdparty" "$SITE/bin" "$BOARD_DIR/pycache"
    rm -f "$STAMPS/warmup" "$STAMPS/board_ort"
    stamp_set board_pip "$key"
    echo "$versions"
}

board_ort() {
    local versions key
    # ONNX Runtime at the host's version (the host quantizes the model with it), and its small pure-Python
    # dependencies; numpy is there already
    versions=$("$HOST_PYTHON" -c 'import sys
from importlib.metadata import PackageNotFoundError, version
def pin(p, fallback):
    try:
        return f"{p}=={version(p)}"
    except PackageNotFoundError:
        return fallback
print(sys.argv[1] or pin("onnxruntime", "onnxruntime==1.32.0"), *(pin(p, p) for p in ("packaging", "flatbuffers", "protobuf")))' \
        "${ORT_VERSION:+onnxruntime==$ORT_VERSION}")
    key="$versions"
    if stamp_ok board_ort "$key" && [ -d "$SITE/onnxruntime/capi" ]; then echo "installed"; return; fi
    # shellcheck disable=SC2086
    PIP_CACHE_DIR="$BOARD_DIR/cache/pip" "$HOST_PYTHON" -m pip install --no-input --disable-pip-version-check -q \
        --target "$SITE" --upgrade --no-deps --only-binary=:all: --no-compile --platform manylinux_2_28_aarch64 \
        --platform manylinux_2_27_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
        --python-version "$PYVER" --implementation cp --abi "cp${PYVER/./}" $versions 2>&1 \
        | grep -v -e "is ignored: it is neither a file nor a directory" -e "Target directory .* already exists" >&2 \
        || true
    [ -d "$SITE/onnxruntime/capi" ] || die "pip did not install the aarch64 onnxruntime into $SITE"
    rm -rf "$SITE/bin" "$BOARD_DIR/pycache"
    rm -f "$STAMPS/warmup"
    stamp_set board_ort "$key"
    echo "$versions"
}

wrappers() {
    mkdir -p "$BOARD_DIR/bin" "$BOARD_DIR/tmp" "$BOARD_DIR/run"
    cat > "$BOARD_DIR/bin/board-exec" <<EOF
#!/bin/sh
# Run an aarch64 program on the emulated board. BOARD_CPU: the qemu CPU model (cortex-a72 = Raspberry Pi 4,
# cortex-a76 = Pi 5); never qemu's default "max", which runs instructions a real Pi lacks.
# BOARD_QEMU_ARGS: more qemu options, e.g. "-plugin $BOARD_DIR/plugins/libicount.so,out=counts.json".
# The sysroot is that core's (sysroot-\$BOARD_CPU: the Pi's /proc/cpuinfo) when setup.sh built one.
cpu="\${BOARD_CPU:-cortex-a72}"
root="$SYSROOT-\$cpu"; [ -d "\$root" ] || root="$SYSROOT"
exec qemu-aarch64 -cpu "\$cpu" -L "\$root" -U LD_PRELOAD -U LD_LIBRARY_PATH \${BOARD_QEMU_ARGS:-} "\$@"
EOF
    cat > "$BOARD_DIR/bin/python3" <<EOF
#!/bin/sh
# The board's Python (Debian arm64 python$PYVER) under qemu-aarch64.
# -0 makes sys.executable this script, so the child Pythons that TVM's RPC server starts come back through
# qemu (there is no binfmt_misc to run an aarch64 ELF directly). Host Python settings must not leak in, and
# bytecode must never be written next to the host's /usr/lib/python$PYVER.
unset PYTHONHOME PYTHONPATH PYTHONSTARTUP PYTHONDONTWRITEBYTECODE PYTHONEXECUTABLE VIRTUAL_ENV
export PYTHONNOUSERSITE=1 PYTHONPYCACHEPREFIX="$BOARD_DIR/pycache" TMPDIR="$BOARD_DIR/tmp"
# the board's own module path (the confined RPC server's sitecustomize), kept for the children it starts
[ -n "\${BOARD_PYTHONPATH:-}" ] && export PYTHONPATH="\$BOARD_PYTHONPATH"
cpu="\${BOARD_CPU:-cortex-a72}"
root="$SYSROOT-\$cpu"; [ -d "\$root" ] || root="$SYSROOT"
exec qemu-aarch64 -cpu "\$cpu" -L "\$root" -U LD_PRELOAD -U LD_LIBRARY_PATH \${BOARD_QEMU_ARGS:-} \\
    -0 "$BOARD_DIR/bin/python3" "\$root/usr/bin/python$PYVER" "\$@"
EOF
    chmod +x "$BOARD_DIR/bin/board-exec" "$BOARD_DIR/bin/python3"
    cat > "$BOARD_DIR/board.env" <<EOF
BOARD_DIR="$BOARD_DIR"
BOARD_SYSROOT="$SYSROOT"
BOARD_SITE="$SITE"
BOARD_PYTHON="$BOARD_DIR/bin/python3"
BOARD_EXEC="$BOARD_DIR/bin/board-exec"
BOARD_ICOUNT_PLUGIN="$BOARD_DIR/plugins/libicount.so"
EOF
    echo "bin/python3 bin/board-exec board.env"
}

plugins() {
    local qver key src="$BOARD_DIR/build/qemu-src"
    qemu-aarch64 -h 2>/dev/null | grep -q -- '^-plugin' || die "this qemu-aarch64 cannot load TCG plugins (use Debian's qemu-user, not qemu-user-static)"
    qver=$(dpkg-query -W -f='${source:Version}' qemu-user)
    key="$qver|$(md5sum < "$HERE/src/icount.c" | cut -c1-12)"
    if stamp_ok plugins "$key" && [ -f "$BOARD_DIR/plugins/libicount.so" ]; then echo "built"; return; fi
    if ! stamp_ok plugin_header "$qver" || [ ! -f "$src/qemu-plugin.h" ]; then
        # no bookworm binary package ships qemu-plugin.h: take it from the matching Debian source package
        local d="$BOARD_DIR/apt-src" orig
        private_apt "$d" amd64 deb-src
        APT_CONFIG="$d/apt.conf" apt-get update -qq >&2
        (cd "$d" && APT_CONFIG="$d/apt.conf" apt-get source --download-only -qq "qemu=$qver" >&2)
        orig=$(compgen -G "$d/qemu_*.orig.tar.*" | head -1) || die "apt-get source qemu=$qver fetched no tarball"
        mkdir -p "$src"
        tar -xf "$orig" -C "$src" --strip-components=3 --wildcards '*/include/qemu/qemu-plugin.h'
        rm -rf "$d"
        stamp_set plugin_header "$qver"
    fi
    mkdir -p "$BOARD_DIR/plugins"
    cc -O2 -shared -fPIC -Wall -Werror -I"$src" -o "$BOARD_DIR/plugins/libicount.so" "$HERE/src/icount.c"
    stamp_set plugins "$key"
    echo "plugins/libicount.so (qemu $qver)"
}

isa_check() {
    local key
    key=$(md5sum < "$HERE/src/isa_check.c" | cut -c1-12)
    if stamp_ok isa_check "$key" && [ -x "$BOARD_DIR/bin/isa_check" ]; then echo "built"; return; fi
    aarch64-linux-gnu-gcc -O2 -Wall -o "$BOARD_DIR/bin/isa_check" "$HERE/src/isa_check.c"
    stamp_set isa_check "$key"
    echo "bin/isa_check"
}

cpuinfo() {  # cpuinfo CPU: what /proc/cpuinfo shows on the Pi with that core, with the emulated core's hwcaps
    local cpu=$1 variant part revision model features i
    case "$cpu" in
        cortex-a72) variant=0x0 part=0xd08 revision=3 model="Raspberry Pi 4 Model B" ;;   # BCM2711, A72 r0p3
        cortex-a76) variant=0x4 part=0xd0b revision=1 model="Raspberry Pi 5 Model B" ;;   # BCM2712, A76 r4p1
        *) die "no Raspberry Pi has a $cpu core" ;;
    esac
    features=$(BOARD_CPU=$cpu "$BOARD_DIR/bin/board-exec" "$BOARD_DIR/bin/isa_check" | sed -n 's/^hwcap: //p')
    [ -n "$features" ] || die "isa_check printed no hwcaps under -cpu $cpu"
    for i in 0 1 2 3; do
        printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\n' "$i" "$features"
        printf 'CPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' "$variant" "$part" "$revision"
    done
    printf 'Model\t\t: %s\n' "$model"
}

cpu_sysroots() {
    local key cpu root done_list=""
    key="$(cat "$STAMPS/sysroot" "$STAMPS/board_pip" "$STAMPS/board_ort" 2>/dev/null | md5sum | cut -c1-12)"
    key="$key|$(md5sum < "$HERE/setup.sh" | cut -c1-12)|$(md5sum < "$HERE/src/isa_check.c" | cut -c1-12)"
    if stamp_ok cpu_sysroots "$key" && [ -z "$(for cpu in $CPUS; do [ -f "$SYSROOT-$cpu/proc/cpuinfo" ] || echo "$cpu"; done)" ]
    then
        echo "up to date"; return
    fi
    for cpu in $CPUS; do
        root="$SYSROOT-$cpu"
        rm -rf "$root" "$root.tmp"
        # hard links: the copy costs no space; the board's files are never written in place
        cp -al "$SYSROOT" "$root.tmp"
        mkdir -p "$root.tmp/proc"
        cpuinfo "$cpu" > "$root.tmp/proc/cpuinfo"
        mv "$root.tmp" "$root"
        done_list="$done_list $cpu"
    done
    rm -f "$STAMPS/warmup"
    stamp_set cpu_sysroots "$key"
    echo "sysroot-{${done_list# }} with a Pi /proc/cpuinfo"
}

warmup() {
    local key out
    key=$(cat "$STAMPS/board_pip" "$STAMPS/board_ort" "$STAMPS/cpu_sysroots")
    if stamp_ok warmup "$key" && [ -d "$BOARD_DIR/pycache" ]; then echo "warm"; return; fi
    # the first import compiles ~600 modules to bytecode (BOARD_DIR/pycache); every board start reuses it.
    # Each core's sysroot has its own paths, so each is warmed; onnxruntime must import (no cpuinfo crash).
    for cpu in $CPUS; do
        out=$(BOARD_CPU=$cpu ORT_DISABLE_TELEMETRY=1 "$BOARD_DIR/bin/python3" -c '
import platform, numpy, tvm, tvm.rpc, tvm.runtime.vm, tvm.exec.rpc_server, tvm.exec.popen_worker, onnxruntime
print(platform.machine(), "python", platform.python_version(), "tvm", tvm.__version__, "numpy", numpy.__version__,
      "onnxruntime", onnxruntime.__version__)') || die "the board Python cannot import tvm and onnxruntime on $cpu"
        [ "${out%% *}" = aarch64 ] || die "the board Python reports '$out', expected aarch64"
    done
    stamp_set warmup "$key"
    echo "$out"
}

BOARD_USER=${BOARD_USER:-tvm-lowbit-board}
board_user() {  # the unprivileged user board.py runs the boards' RPC servers as, when root starts them
    if [ "$(id -u)" != 0 ]; then echo "not root: the boards run as $(id -un)"; return; fi
    if ! id -u "$BOARD_USER" >/dev/null 2>&1; then
        useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$BOARD_USER" \
            || { echo "useradd failed: the boards run as root (confined to their work folder)"; return; }
    fi
    chmod -R a+rX,go-w "$BOARD_DIR"  # the sysroot, qemu, the wrappers, the bytecode: readable, not writable
    mkdir -p "$BOARD_DIR/tmp"  # the servers' work folders (TMPDIR): the board user's only writable place
    chown "$BOARD_USER" "$BOARD_DIR/tmp" && chmod 700 "$BOARD_DIR/tmp"
    echo "boards started by root run as $BOARD_USER"
}

main() {
    [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ] || die "the emulated board is built on Linux x86_64 hosts only"
    command -v dpkg-deb >/dev/null || die "needs a Debian host (dpkg-deb, apt-get)"
    if [ "$FORCE" = 1 ]; then log "FORCE=1: removing $BOARD_DIR"; rm -rf "$BOARD_DIR"; fi
    mkdir -p "$BOARD_DIR"
    # one setup at a time (parallel CI jobs, several users of one checkout)
    exec 9> "$BOARD_DIR/.setup.lock"
    flock -w 900 9 || die "another setup of $BOARD_DIR has held the lock for 15 minutes"
    local t0; t0=$(date +%s)
    step host-packages host_packages
    step arm64-debs arm64_debs
    step sysroot sysroot
    step board-python board_pip
    step board-ort board_ort
    step wrappers wrappers
    step plugins plugins
    step isa-check isa_check
    step cpu-sysroots cpu_sysroots
    step warm-up warmup
    step board-user board_user
    log "board ready in $BOARD_DIR ($(du -sh "$BOARD_DIR" | cut -f1), setup $(( $(date +%s) - t0 )) s); start it with:"
    log "  $HOST_PYTHON scripts/board/board.py start"
}
main "$@"
