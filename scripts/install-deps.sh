#!/usr/bin/env bash
# Install what strata's tests and benchmarks need on Debian bookworm:
# QEMU 10's qemu-img/qemu-io/qemu-nbd (package qemu-utils) from bookworm-backports,
# the reference implementation the tests compare against, QEMU 10's x86 system
# emulator and guest agent from the same suite (the VM tests boot a real guest, built
# by scripts/build-test-guest.sh, which also needs e2fsprogs and kmod), and libnbd's
# NBD clients (libnbd-bin) from bookworm itself.
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

# Debian's backports suite carries QEMU 10; plain bookworm has 7.2.
if have_backports; then
  say "bookworm-backports is already configured"
else
  say "adding bookworm-backports to apt sources"
  "${SUDO[@]}" tee /etc/apt/sources.list.d/strata-backports.sources >/dev/null <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
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
"${SUDO[@]}" apt-get install -y -q libnbd-bin openssl e2fsprogs kmod

# qemu-ga, mkfs.ext4 and depmod live in sbin, which a user's PATH may lack.
for tool in qemu-img qemu-io qemu-nbd nbdinfo qemu-system-x86_64 qemu-ga mkfs.ext4 depmod; do
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
