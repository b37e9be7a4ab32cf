#!/usr/bin/env bash
# Build the nanotrl image (CPU torch + dev requirements) on a Debian host with no container registry,
# then check it: the built-in SFT on 2 processes saves a model, and the fast tests pass.
#
#   sudo bash deploy/build_image.sh
#
# Steps (each timed; the script exits non-zero on the first failure, and after the checks if any failed):
#   1. apt-get install podman buildah mmdebstrap curl, if missing.
#   2. The base image, from Debian's packages (no registry needed): mmdebstrap a minbase bookworm
#      with python3 (3.11), python3-venv and ca-certificates, create a venv /opt/venv in it, and
#      `podman import` it as $BASE_IMAGE with /opt/venv/bin first on PATH, so that `python` and
#      `pip` are the venv's. Why a venv and not PIP_BREAK_SYSTEM_PACKAGES=1: bookworm's pip refuses
#      to install into the system Python (PEP 668, EXTERNALLY-MANAGED) because pip's files would be
#      mixed with dpkg's under /usr and pip cannot uninstall or upgrade a Debian-installed package;
#      a venv keeps the two apart, and gives the same layout as python:3.11-slim (pip installs into
#      a prefix of its own, python/pip/torchrun on PATH). Skipped when $BASE_IMAGE exists
#      (REBUILD_BASE=1 rebuilds it).
#   3. deploy/Dockerfile, built with buildah (chroot isolation: no user namespaces or cgroups needed)
#      and --build-arg BASE=$BASE_IMAGE DEV=1 and the CPU torch: TORCH_INDEX (the CPU wheel index)
#      when it answers, else a local CPU wheel (torch-*+cpu-cp311-*.whl in $TORCH_WHEEL_DIRS or
#      $PIP_FIND_LINKS), mounted into the build read-only and passed as TORCH_WHEEL. The host's CA
#      bundle is mounted over the image's during the build (for pip behind a TLS-intercepting proxy);
#      it does not end up in the image.
#   4. In a working container of the image (buildah from + buildah run --isolation chroot --uts
#      host; podman run cannot set rlimits on this kind of host): (a) torchrun --standalone --nproc_per_node 2
#      train_sft.py --max-steps 30 --eval-every 0 --out /tmp/sft, and its model saved; (b) python -m
#      pytest -q -m "not slow" tests, with $SHARED (the repository's ../shared: tokenizers, data)
#      mounted read-only at /shared, which is where tests in /nanotrl look (../shared).
#
# Environment (all optional): IMAGE, BASE_IMAGE, REBUILD_BASE=1, SUITE, MIRROR, WORK (scratch
# directory), TORCH_INDEX (empty: torch from PyPI, i.e. the CUDA build), TORCH_WHEEL_DIRS, SHARED,
# SFT_TIMEOUT, TEST_TIMEOUT (seconds), SKIP_CHECKS=1.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE=${IMAGE:-localhost/nanotrl:cpu-dev}
BASE_IMAGE=${BASE_IMAGE:-localhost/nanotrl-base}
REBUILD_BASE=${REBUILD_BASE:-0}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
WORK=${WORK:-/var/tmp/nanotrl-image}
TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}
TORCH_WHEEL_DIRS=${TORCH_WHEEL_DIRS:-/opt/wheels ${PIP_FIND_LINKS:-}}
SHARED=${SHARED:-$(dirname "$REPO")/shared}
SFT_TIMEOUT=${SFT_TIMEOUT:-1800}
TEST_TIMEOUT=${TEST_TIMEOUT:-3600}
CA=/etc/ssl/certs/ca-certificates.crt
ISO=(--isolation chroot)
# buildah run: chroot isolation gives the container its own UTS namespace, with a hostname (the
# container's ID) that is in no /etc/hosts, so torchrun's rendezvous retries resolving it for ever;
# the host's hostname resolves (the container shares the host's network anyway).
RUN_OPTS=(--isolation chroot --uts host)

T0=$SECONDS
declare -a SUMMARY=()
note() { printf '\n=== %s\n' "$*"; }
die() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
record() { SUMMARY+=("$(printf '%-4s %-44s %5ds' "$1" "$2" "$3")"); printf '%s: %s (%ds)\n' "$1" "$2" "$3"; }
summary() {
    printf '\n=== summary\n'
    for line in "${SUMMARY[@]}"; do printf '%s\n' "$line"; done
    printf 'total %ds\n' $((SECONDS - T0))
}

[ "$(id -u)" = 0 ] || die "run as root (apt-get, mmdebstrap and buildah need it)"
cd "$REPO"
mkdir -p "$WORK"

# --- 1. tools -----------------------------------------------------------------------------------
t=$SECONDS
missing=()
for tool in podman buildah mmdebstrap curl; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
    note "installing ${missing[*]}"
    for try in 1 2 3; do apt-get update -q && break; [ $try = 3 ] && die "apt-get update"; sleep 5; done
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
record ok "tools ($(podman --version | cut -d' ' -f3), buildah $(buildah --version | cut -d' ' -f3))" $((SECONDS - t))

# --- 2. base image from Debian's packages ---------------------------------------------------------
t=$SECONDS
if [ "$REBUILD_BASE" != 1 ] && podman image exists "$BASE_IMAGE"; then
    record ok "base image $BASE_IMAGE (exists)" $((SECONDS - t))
else
    note "base image $BASE_IMAGE: mmdebstrap $SUITE"
    rm -f "$WORK/base.tar"
    mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --customize-hook='chroot "$1" python3 -m venv /opt/venv' \
        --customize-hook='chroot "$1" /opt/venv/bin/python -c "import ssl, venv; print(\"python ok\")"' \
        "$SUITE" "$WORK/base.tar" \
        "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" "deb $SECURITY_MIRROR $SUITE-security main"
    podman import \
        --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV VIRTUAL_ENV=/opt/venv' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python"]' \
        "$WORK/base.tar" "$BASE_IMAGE"
    rm -f "$WORK/base.tar"
    record ok "base image $BASE_IMAGE (built)" $((SECONDS - t))
fi

# --- 3. the image ---------------------------------------------------------------------------------
t=$SECONDS
build_args=(--build-arg "BASE=$BASE_IMAGE" --build-arg DEV=1)
mounts=()
[ -f "$CA" ] && mounts+=(-v "$CA:$CA:ro")
if [ -z "$TORCH_INDEX" ]; then
    torch_from="PyPI (CUDA build)"
elif curl -fsS --max-time 20 -o /dev/null "${TORCH_INDEX%/}/torch/" 2>/dev/null; then
    build_args+=(--build-arg "TORCH_INDEX=$TORCH_INDEX")
    torch_from=$TORCH_INDEX
else
    wheel=""
    for dir in $TORCH_WHEEL_DIRS; do
        dir=${dir#file://}
        [ -d "$dir" ] || continue
        found=$(ls "$dir"/torch-*+cpu-cp311-cp311-*linux*_x86_64.whl 2>/dev/null | sort -V | tail -n 1 || true)
        [ -n "$found" ] && wheel=$found
    done
    [ -n "$wheel" ] || die "the CPU wheel index $TORCH_INDEX does not answer and no torch-*+cpu-cp311 wheel is in: $TORCH_WHEEL_DIRS"
    echo "note: $TORCH_INDEX does not answer; using the local wheel $wheel"
    mounts+=(-v "$(dirname "$wheel"):/wheels:ro")
    build_args+=(--build-arg "TORCH_WHEEL=/wheels/$(basename "$wheel")")
    torch_from=$wheel
fi
note "building $IMAGE from deploy/Dockerfile (torch from $torch_from)"
buildah bud "${ISO[@]}" --layers -f deploy/Dockerfile --ignorefile deploy/Dockerfile.dockerignore \
    "${build_args[@]}" "${mounts[@]}" -t "$IMAGE" . || die "buildah bud"
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
record ok "image $IMAGE ($(numfmt --to=si --suffix=B "$size"))" $((SECONDS - t))

if [ "${SKIP_CHECKS:-0}" = 1 ]; then summary; exit 0; fi

# --- 4. checks inside the image -------------------------------------------------------------------
ctr=$(buildah from --pull=false "$IMAGE")
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
failed=0

note "(a) SFT on 2 processes"
t=$SECONDS
if timeout "$SFT_TIMEOUT" buildah run "${RUN_OPTS[@]}" "$ctr" -- \
        torchrun --standalone --nproc_per_node 2 train_sft.py --max-steps 30 --eval-every 0 --out /tmp/sft \
   && buildah run "${RUN_OPTS[@]}" "$ctr" -- sh -c 'ls -l /tmp/sft/model && test -f /tmp/sft/model/config.json && ls /tmp/sft/model/*.safetensors >/dev/null'; then
    record PASS "sft: 2 processes, 30 steps, model saved" $((SECONDS - t))
else
    record FAIL "sft: 2 processes, 30 steps, model saved" $((SECONDS - t)); failed=1
fi

note "(b) fast tests"
t=$SECONDS
shared_mount=()
if [ -d "$SHARED" ]; then
    shared_mount=(-v "$SHARED:/shared:ro")   # the image's repo is /nanotrl; the tests read ../shared
else
    echo "note: $SHARED not found: the tests that need it skip"
fi
if timeout "$TEST_TIMEOUT" buildah run "${RUN_OPTS[@]}" "${shared_mount[@]}" "$ctr" -- \
        python -m pytest -q -p no:cacheprovider -m "not slow" tests; then
    record PASS "tests: pytest -m 'not slow'" $((SECONDS - t))
else
    record FAIL "tests: pytest -m 'not slow'" $((SECONDS - t)); failed=1
fi

summary
exit $failed
