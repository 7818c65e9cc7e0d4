#!/usr/bin/env bash
# Install what strata's tests and benchmarks need on Debian bookworm:
# QEMU 10's qemu-img/qemu-io/qemu-nbd (package qemu-utils) from bookworm-backports,
# the reference implementation the tests compare against, and libnbd's NBD
# clients (libnbd-bin) from bookworm itself.
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

# Only qemu-utils comes from backports (with whatever it needs from there);
# nothing else, in particular no qemu-system-* from plain bookworm.
"${SUDO[@]}" apt-get install -y -q -t bookworm-backports qemu-utils
"${SUDO[@]}" apt-get install -y -q libnbd-bin openssl

for tool in qemu-img qemu-io qemu-nbd nbdinfo; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is missing after the install"
done

version=$(qemu-img --version | head -n1)
major=$(printf '%s\n' "$version" | sed -n 's/^qemu-img version \([0-9][0-9]*\)\..*/\1/p')
if [ -z "$major" ] || [ "$major" -lt 10 ]; then
  die "strata's tests need QEMU 10 or newer, but qemu-img reports: ${version:-nothing}"
fi
say "$version"
