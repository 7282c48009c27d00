#!/usr/bin/env bash
# Build ember's busybox guest userland, twice with the same content:
#
#   ${EMBER_CACHE:-$HOME/.cache/ember}/guest/initramfs.cpio   uncompressed newc
#   ${EMBER_CACHE:-$HOME/.cache/ember}/guest/rootfs.ext4      ext4 image (64 MiB)
#
# Content: /init (resources/rootfs/init), /bin/busybox (Debian busybox-static),
# /bin/ember-agent (agent/, built here with cargo, statically linked),
# /bin/sh -> busybox, /sbin/init -> /init, /etc/{fstab,passwd,group}, empty
# /proc /sys /dev /tmp /root /run /mnt, and the device node /dev/console.
# Everything is owned by 0:0. No root rights, mounts or fakeroot are needed:
# the cpio comes from `cpio -o -H newc --owner=0:0` plus a hand-written newc
# entry for /dev/console, the image from `mkfs.ext4 -d` plus debugfs.
# Rebuilt only when this script, rootfs/init, agent/, the size or the versions of
# busybox-static/e2fsprogs/cpio change (hash in .../guest/.rootfs-stamp).
#
# Environment: EMBER_CACHE (cache root), EMBER_ROOTFS_SIZE (mkfs size, 64M).
set -euo pipefail

msg() { printf 'build-rootfs: %s\n' "$*" >&2; }
die() { msg "error: $*"; exit 1; }
case ${1:-} in
  -h | --help) sed -n '2,17s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
  "") ;;
  *) die "no arguments expected (see --help)" ;;
esac

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${EMBER_CACHE:-$HOME/.cache/ember}
size=${EMBER_ROOTFS_SIZE:-64M}
init=$here/rootfs/init
[ -f "$init" ] || die "missing $init"

deps=(busybox-static e2fsprogs cpio)
missing=()
for p in "${deps[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q ' installed$' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  msg "installing: ${missing[*]}"
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi
# busybox-static conflicts with busybox; both ship /bin/busybox, check it is static.
busybox=/bin/busybox
[ -x "$busybox" ] || die "$busybox not found"
if LC_ALL=C file -b "$busybox" 2>/dev/null | grep -q dynamically; then
  die "$busybox is dynamically linked: install busybox-static"
fi
PATH=$PATH:/sbin:/usr/sbin
command -v mkfs.ext4 >/dev/null && command -v debugfs >/dev/null || die "mkfs.ext4/debugfs not found (e2fsprogs)"

guest=$cache/guest
out_cpio=$guest/initramfs.cpio
out_ext4=$guest/rootfs.ext4
stamp=$guest/.rootfs-stamp
agent_dir=$here/../agent
[ -f "$agent_dir/Cargo.toml" ] || die "missing $agent_dir/Cargo.toml"
command -v cargo >/dev/null || die "cargo not found (the guest agent is built with it)"
hash=$({
  echo "size=$size"
  dpkg-query -W "${deps[@]}"
  cat "${BASH_SOURCE[0]}" "$init"
  (cd "$agent_dir" && find Cargo.toml Cargo.lock src -type f 2>/dev/null | LC_ALL=C sort | xargs cat)
} | sha256sum | cut -d' ' -f1)

print_outputs() {
  echo "initramfs: $out_cpio"
  echo "rootfs:    $out_ext4"
}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$hash" ] && [ -f "$out_cpio" ] && [ -f "$out_ext4" ]; then
  msg "rootfs is up to date"
  print_outputs
  exit 0
fi

mkdir -p "$guest" "$cache/build"
stage=$cache/build/rootfs
rm -rf "$stage"
mkdir -p "$stage"
trap 'rm -rf "$stage" "$stage.debugfs" "$stage.debugfs.err" "$out_cpio.tmp" "$out_ext4.tmp"' EXIT

# --- the agent -----------------------------------------------------------------
# Static for the host target (no musl target needed): glibc's static parts it uses
# (no NSS, no dlopen) work without any library in the guest.
host_target=$(rustc -vV | sed -n 's/^host: //p')
msg "building ember-agent for $host_target"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release --locked \
  --manifest-path "$agent_dir/Cargo.toml" --target "$host_target" \
  --target-dir "$cache/build/agent"
agent=$cache/build/agent/$host_target/release/ember-agent
if LC_ALL=C file -b "$agent" 2>/dev/null | grep -q dynamically; then
  die "$agent is dynamically linked"
fi

# --- the tree ----------------------------------------------------------------
msg "staging the tree in $stage"
(
  cd "$stage"
  umask 022
  mkdir -p bin sbin etc dev proc sys tmp root run mnt
  chmod 1777 tmp
  chmod 0700 root
  install -m 0755 "$init" init
  install -m 0755 "$busybox" bin/busybox
  install -m 0755 "$agent" bin/ember-agent
  ln -s busybox bin/sh
  ln -s ../init sbin/init
  cat >etc/fstab <<'EOF'
proc      /proc  proc      nosuid,nodev,noexec  0 0
sysfs     /sys   sysfs     nosuid,nodev,noexec  0 0
devtmpfs  /dev   devtmpfs  nosuid               0 0
EOF
  echo 'root::0:0:root:/root:/bin/sh' >etc/passwd
  echo 'root:x:0:' >etc/group
)

# --- initramfs.cpio ------------------------------------------------------------
# One newc header: ino mode uid gid nlink mtime filesize devmajor devminor
# rdevmajor rdevminor namesize check, then the NUL-terminated name, padded to 4.
newc_entry() { # name mode(octal) rdevmajor rdevminor
  local name=$1 mode=$(($2)) namesize=$((${#1} + 1))
  printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%s\0' \
    0 "$mode" 0 0 1 0 0 0 0 "$3" "$4" "$namesize" 0 "$name"
  local pad=$(((4 - (110 + namesize) % 4) % 4))
  [ "$pad" -eq 0 ] || head -c "$pad" /dev/zero
}
msg "writing $out_cpio"
{
  (cd "$stage" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
    cpio -o -H newc --owner=0:0 --reproducible --quiet)
  # A second archive with the console node (the kernel reads concatenated
  # archives): char 5:1, mode 0600, so init has a console before devtmpfs.
  newc_entry dev/console 0020600 5 1
  newc_entry 'TRAILER!!!' 0 0 0
} >"$out_cpio.tmp"
mv -f "$out_cpio.tmp" "$out_cpio"

# --- rootfs.ext4 ---------------------------------------------------------------
msg "writing $out_ext4 ($size)"
rm -f "$out_ext4.tmp"
mkfs.ext4 -q -F -L ember-root -E root_owner=0:0 -d "$stage" "$out_ext4.tmp" "$size" >/dev/null
{
  # debugfs links the new node into its cwd under the name given.
  echo "cd /dev"
  echo "mknod console c 5 1"
  echo "cd /"
  echo "sif /dev/console mode 020600"
  # Owner 0:0 for everything, also when this runs without root rights.
  (cd "$stage" && find . -mindepth 1 -printf '/%P\n') | while IFS= read -r p; do
    echo "sif \"$p\" uid 0"
    echo "sif \"$p\" gid 0"
  done
} >"$stage.debugfs"
# debugfs exits 0 even when a command fails: any stderr line but its banner
# is an error.
debugfs -w -f "$stage.debugfs" "$out_ext4.tmp" >/dev/null 2>"$stage.debugfs.err" || true
if grep -v '^debugfs [0-9]' "$stage.debugfs.err" >&2; then
  die "debugfs failed on $out_ext4.tmp"
fi
e2fsck -fn "$out_ext4.tmp" >/dev/null 2>&1 || die "e2fsck found problems in $out_ext4.tmp"
mv -f "$out_ext4.tmp" "$out_ext4"

echo "$hash" >"$stamp"
msg "done"
print_outputs
