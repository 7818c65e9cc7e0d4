#!/usr/bin/env bash
# Install what strata's tests and benchmarks need on Debian bookworm:
# QEMU 10's qemu-img/qemu-io/qemu-nbd (package qemu-utils) from bookworm-backports,
# the reference implementation the tests compare against, QEMU 10's x86 system
# emulator and guest agent from the same suite (the VM tests boot a real guest, built
# by scripts/build-test-guest.sh, which also needs e2fsprogs and kmod), and libnbd's
# NBD clients (libnbd-bin) from bookworm itself. With STRATA_BENCH_DEPS=1 it also
# installs libvirt 11 (daemon and virsh, from bookworm-backports), which only
# scripts/bench-vm.sh compares against; the tests never need it.
# Idempotent. Runs as root, or through sudo when that is available.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

say() { echo "install-deps: $*"; }
die() { echo "install-deps: ERROR: $*" >&2; exit 1; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || die "must run as root (or with sudo available)"
  SUDO=(sudo env DEBIAN_FRONTEND=noninteractive)
fi

# Is a bookworm-backports suite configured (in a file apt reads, not commented out)?
have_backports() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    if sed 's/#.*//' "$f" | grep -Eq '(^|[[:space:]])bookworm-backports([[:space:]]|$)'; then
      return 0
    fi
  done
  return 1
}

# The machine's own Debian archive for a suite: the first "URI SIGNED-BY" (SIGNED-BY
# may be empty) of an enabled deb source serving exactly that suite, in either of
# apt's source formats. A local mirror or a proxy the machine is set up with is
# thereby used for backports too; apt's proxy settings stay as they are.
archive_of_suite() {
  local suite=$1 f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    sed 's/#.*//' "$f" | awk -v suite="$suite" '
      $1 != "deb" { next }
      {
        opts = ""; i = 2
        if ($2 ~ /^\[/) {
          while (i <= NF) { opts = opts " " $i; if ($i ~ /\]$/) { i++; break } ; i++ }
        }
        if ($(i + 1) != suite) next
        key = ""
        if (match(opts, /signed-by=[^] ]+/)) key = substr(opts, RSTART + 10, RLENGTH - 10)
        print $i, key; exit
      }'
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk -v suite="$suite" '
      function flush() {
        if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && enabled != "no" && uris != "") {
          split(uris, u, " "); print u[1], key; found = 1; exit
        }
        types = ""; uris = ""; suites = ""; key = ""; enabled = ""
      }
      /^[[:space:]]*#/ { next }
      /^[[:space:]]*$/ { flush(); next }
      {
        field = tolower($1); sub(/:$/, "", field); $1 = ""; sub(/^ +/, "")
        if (field == "types") types = $0
        else if (field == "uris") uris = $0
        else if (field == "suites") suites = $0
        else if (field == "signed-by") key = $0
        else if (field == "enabled") enabled = tolower($0)
      }
      END { if (!found) flush() }' "$f"
  done
}

# Debian's backports suite carries QEMU 10; plain bookworm has 7.2.
if have_backports; then
  say "bookworm-backports is already configured"
else
  read -r archive key < <(archive_of_suite bookworm | head -n1) || true
  [ -n "${archive:-}" ] ||
    die "no apt source serves Debian bookworm on this machine; add bookworm-backports to apt's sources and run again"
  say "adding bookworm-backports from $archive to apt sources"
  {
    echo "Types: deb"
    echo "URIs: $archive"
    echo "Suites: bookworm-backports"
    echo "Components: main"
    [ -z "${key:-}" ] || echo "Signed-By: $key"
  } | "${SUDO[@]}" tee /etc/apt/sources.list.d/strata-backports.sources >/dev/null
fi

# Mirrors hiccup: try the index update a few times before giving up.
for attempt in 1 2 3; do
  if "${SUDO[@]}" apt-get update -q; then
    break
  fi
  [ "$attempt" -lt 3 ] || die "apt-get update failed $attempt times"
  say "apt-get update failed; retrying in 10 s"
  sleep 10
done

# The QEMU packages come from backports together, in one transaction, so the
# emulator, the agent and the tools share one QEMU version (with whatever they need
# from there); never plain bookworm's qemu-system-x86 (7.2). The host's agent also
# provides, for the guest builder's ldd, the libraries the guest's agent needs.
"${SUDO[@]}" apt-get install -y -q --no-install-recommends -t bookworm-backports \
  qemu-utils qemu-system-x86 qemu-guest-agent
# gnutls-bin: certtool makes the certificates of the NBD TLS parity tests.
# zlib1g-dev, pkg-config: strata links the system's zlib, the one QEMU uses, so
# that compressed clusters are the bytes qemu-img writes (without them the zlib
# crate builds its own copy of the same library).
"${SUDO[@]}" apt-get install -y -q libnbd-bin openssl gnutls-bin e2fsprogs kmod restic python3-venv \
  zlib1g-dev pkg-config

# libvirt from the same suite, so it drives the same QEMU; only for the VM benchmark.
if [ "${STRATA_BENCH_DEPS:-0}" = 1 ]; then
  "${SUDO[@]}" apt-get install -y -q -t bookworm-backports libvirt-daemon-system libvirt-clients
  command -v virsh >/dev/null 2>&1 || die "virsh is missing after the install"
  say "$(virsh --version | sed 's/^/libvirt /')"
fi

# qemu-ga, mkfs.ext4 and depmod live in sbin, which a user's PATH may lack.
for tool in qemu-img qemu-io qemu-nbd nbdinfo qemu-system-x86_64 qemu-ga mkfs.ext4 depmod restic; do
  PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null 2>&1 || die "$tool is missing after the install"
done

for tool in qemu-img qemu-system-x86_64; do
  version=$("$tool" --version | head -n1)
  major=$(printf '%s\n' "$version" | sed -n 's/^.* version \([0-9][0-9]*\)\..*/\1/p')
  if [ -z "$major" ] || [ "$major" -lt 10 ]; then
    die "strata's tests need QEMU 10 or newer, but $tool reports: ${version:-nothing}"
  fi
  say "$version"
done

# Garage, the S3 server the backup tests keep repositories in. It is built from
# the crate registry once (about 20 CPU-minutes) and reused when present; the
# version is pinned so its command-line output stays what the tests read.
GARAGE_VERSION=2.5.0
garage_bin="${CARGO_HOME:-$HOME/.cargo}/bin/garage"
if ! { [ -x "$garage_bin" ] && "$garage_bin" --version 2>/dev/null | grep -q ":$GARAGE_VERSION "; }; then
  say "building garage $GARAGE_VERSION (once; reused when present)"
  cargo install --locked --quiet garage --version "$GARAGE_VERSION"
fi
"$garage_bin" --version >/dev/null 2>&1 || die "garage is missing after the install"
say "garage $GARAGE_VERSION: $garage_bin"
