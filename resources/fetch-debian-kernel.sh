#!/usr/bin/env bash
# Fetch Debian's stock cloud kernel for booting in ember, without installing
# it on the host:
#
#   ${EMBER_CACHE:-$HOME/.cache/ember}/guest/debian/vmlinuz   (bzImage)
#   ${EMBER_CACHE:-$HOME/.cache/ember}/guest/debian/config    (its .config)
#
# Resolves the image package that linux-image-cloud-amd64 depends on,
# `apt-get download`s it and unpacks it with `dpkg-deb -x` in a temporary
# directory. Does nothing when that package version is already there.
# This kernel has ACPI/PCI and modules, and no PVM workarounds: on a PVM host
# it only gets through early boot.
set -euo pipefail

msg() { printf 'fetch-debian-kernel: %s\n' "$*" >&2; }
die() { msg "error: $*"; exit 1; }
case ${1:-} in
  -h | --help) sed -n '2,12s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
  "") ;;
  *) die "no arguments expected (see --help)" ;;
esac

meta=linux-image-cloud-amd64
cache=${EMBER_CACHE:-$HOME/.cache/ember}
dest=$cache/guest/debian
stamp=$dest/.stamp

resolve() {
  apt-cache depends "$meta" 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[^ ]*\)$/\1/p' | grep -v -- "-dbg$" | head -n1
}
pkg=$(resolve || true)
if [ -z "$pkg" ]; then
  msg "$meta unknown to apt: running apt-get update"
  if [ "$(id -u)" -eq 0 ]; then apt-get update; else sudo apt-get update; fi
  pkg=$(resolve || true)
fi
[ -n "$pkg" ] || die "cannot resolve the image package of $meta"
ver=$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')
[ -n "$ver" ] && [ "$ver" != "(none)" ] || die "no candidate version for $pkg"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$pkg $ver" ] && [ -f "$dest/vmlinuz" ]; then
  msg "$pkg $ver is already in $dest"
  echo "vmlinuz: $dest/vmlinuz"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
apt_opts=()
# As root, apt would drop to its _apt user, which cannot write to the private
# temporary directory: download as root instead of warning about it.
[ "$(id -u)" -ne 0 ] || apt_opts=(-o APT::Sandbox::User=root)
msg "downloading $pkg $ver"
(cd "$tmp" && apt-get download -q "${apt_opts[@]}" "$pkg=$ver") >&2
deb=$(ls "$tmp"/*.deb)
msg "unpacking $(basename "$deb")"
dpkg-deb -x "$deb" "$tmp/root"
set -- "$tmp"/root/boot/vmlinuz-*
[ $# -eq 1 ] && [ -f "$1" ] || die "expected one boot/vmlinuz-* in $(basename "$deb")"
kver=${1##*/vmlinuz-}

mkdir -p "$dest"
cp "$1" "$dest/vmlinuz.tmp" && mv -f "$dest/vmlinuz.tmp" "$dest/vmlinuz"
if [ -f "$tmp/root/boot/config-$kver" ]; then
  cp "$tmp/root/boot/config-$kver" "$dest/config.tmp" && mv -f "$dest/config.tmp" "$dest/config"
fi
echo "$pkg $ver" >"$stamp"
msg "installed Linux $kver ($pkg $ver)"
echo "vmlinuz: $dest/vmlinuz"
