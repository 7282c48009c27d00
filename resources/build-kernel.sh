#!/usr/bin/env bash
# Build ember's guest Linux kernel from Debian's linux-source-6.1.
#
#   resources/build-kernel.sh [microvm|pvm]      (default: microvm)
#
#   microvm  tinyconfig + kernel/microvm.config: for hosts with hardware KVM.
#   pvm      the same + kernel/pvm.config (CONFIG_PVM_NATIVE_QUIRKS and speed
#            options) for PVM hosts that emulate the guest kernel.
#
# Output: ${EMBER_CACHE:-$HOME/.cache/ember}/guest/<variant>/{vmlinux,bzImage}
# (plus config and System.map). Work tree: .../build/. The kernel is rebuilt
# only when this script, the fragments, the patch, the linux-source package or
# the compiler change (hash in .../guest/<variant>/.stamp).
#
# Environment: EMBER_CACHE (cache root), EMBER_JOBS (make -j, default nproc),
# EMBER_VERBOSE=1 (show the make output instead of logging it to a file).
set -euo pipefail

usage() { sed -n '2,17s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }
msg() { printf 'build-kernel: %s\n' "$*" >&2; }
die() { msg "error: $*"; exit 1; }

variant=${1:-microvm}
case $variant in
  microvm | pvm) ;;
  -h | --help) usage; exit 0 ;;
  *) usage >&2; die "unknown variant '$variant' (expected microvm or pvm)" ;;
esac
[ $# -le 1 ] || die "too many arguments"

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${EMBER_CACHE:-$HOME/.cache/ember}
jobs=${EMBER_JOBS:-$(nproc)}
src_pkg=linux-source-6.1
src_tar=/usr/src/linux-source-6.1.tar.xz
patch_file=$here/kernel/pvm-native-quirks-6.1.patch
fragments=("$here/kernel/microvm.config")
[ "$variant" = pvm ] && fragments+=("$here/kernel/pvm.config")
for f in "${fragments[@]}" "$patch_file"; do [ -f "$f" ] || die "missing input $f"; done

# --- build dependencies -----------------------------------------------------
deps=(linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev cpio xz-utils lz4 patch util-linux)
missing=()
for p in "${deps[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q ' installed$' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  msg "installing build dependencies: ${missing[*]}"
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi
[ -f "$src_tar" ] || die "$src_tar not found (package $src_pkg)"

# --- inputs hash ------------------------------------------------------------
src_ver=$(dpkg-query -W -f='${Version}' "$src_pkg")
cc_ver=$(gcc --version | head -n1)
src_hash=$({ echo "$src_pkg $src_ver"; cat "$patch_file"; } | sha256sum | cut -d' ' -f1)
hash=$({
  echo "variant=$variant"
  echo "source=$src_pkg $src_ver"
  echo "cc=$cc_ver"
  cat "${BASH_SOURCE[0]}" "$patch_file" "${fragments[@]}"
} | sha256sum | cut -d' ' -f1)

guest_dir=$cache/guest/$variant
stamp=$guest_dir/.stamp
build_root=$cache/build
src=$build_root/linux-6.1
out=$build_root/out-$variant

print_outputs() {
  echo "vmlinux: $guest_dir/vmlinux"
  echo "bzImage: $guest_dir/bzImage"
}

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$hash" ] &&
  [ -f "$guest_dir/vmlinux" ] && [ -f "$guest_dir/bzImage" ]; then
  msg "$variant kernel is up to date ($src_pkg $src_ver)"
  print_outputs
  exit 0
fi

mkdir -p "$build_root" "$guest_dir"
exec 9>"$build_root/.lock"
flock 9 || die "cannot lock $build_root/.lock"

# --- source tree: unpacked once, patched; shared by the variants -------------
# The patch only acts when CONFIG_PVM_NATIVE_QUIRKS=y, so the microvm variant
# builds from the same patched tree.
if [ ! -f "$src/.ember-src" ] || [ "$(cat "$src/.ember-src")" != "$src_hash" ]; then
  msg "unpacking $src_tar ($src_pkg $src_ver) into $src"
  rm -rf "$src" "$build_root"/out-* "$build_root/unpack"
  mkdir -p "$build_root/unpack"
  tar -xf "$src_tar" -C "$build_root/unpack"
  msg "applying $(basename "$patch_file")"
  patch -d "$build_root/unpack/linux-source-6.1" -p1 --forward --batch --fuzz=0 -s <"$patch_file" ||
    die "$(basename "$patch_file") does not apply to $src_pkg $src_ver"
  mv "$build_root/unpack/linux-source-6.1" "$src"
  rmdir "$build_root/unpack"
  echo "$src_hash" >"$src/.ember-src"
fi
if [ -d "$out" ] && [ "$(cat "$out/.ember-src" 2>/dev/null)" != "$src_hash" ]; then
  rm -rf "$out"
fi
mkdir -p "$out"
echo "$src_hash" >"$out/.ember-src"

kmake() {
  make -C "$src" O="$out" ARCH=x86_64 KBUILD_BUILD_USER=ember KBUILD_BUILD_HOST=ember "$@"
}
log=$out/build.log
: >"$log"
run_logged() {
  if [ "${EMBER_VERBOSE:-0}" = 1 ]; then
    "$@" 2>&1 | tee -a "$log"
  elif ! "$@" >>"$log" 2>&1; then
    tail -n 40 "$log" >&2
    die "'$*' failed; full log: $log"
  fi
}

# --- configuration ----------------------------------------------------------
msg "configuring $variant: tinyconfig + ${fragments[*]##*/}"
run_logged kmake tinyconfig
(cd "$out" && "$src/scripts/kconfig/merge_config.sh" -m -O "$out" "$out/.config" "${fragments[@]}") >>"$log" 2>&1 ||
  die "merge_config.sh failed; log: $log"
run_logged kmake olddefconfig

# Every line of the fragments (later fragments win) must be in .config as
# written; "is not set" also accepts a symbol that is absent (unmet depends).
declare -A want=() have=()
parse_config() { # file, name of the associative array to fill
  local -n into=$2
  local line key
  while IFS= read -r line || [ -n "$line" ]; do
    case $line in
      CONFIG_*=*) key=${line%%=*}; into[$key]=${line#*=} ;;
      "# CONFIG_"*" is not set") key=${line#\# }; into[${key%% *}]=n ;;
    esac
  done <"$1"
}
for f in "${fragments[@]}"; do parse_config "$f" want; done
parse_config "$out/.config" have
bad=0
for key in $(printf '%s\n' "${!want[@]}" | sort); do
  w=${want[$key]} h=${have[$key]:-n}
  if [ "$w" != "$h" ]; then
    msg "config mismatch: $key requested ${w}, got ${h} (check its dependencies/choices)"
    bad=$((bad + 1))
  fi
done
[ "$bad" -eq 0 ] || die "$bad fragment option(s) did not end up in $out/.config"
msg "config verified: all ${#want[@]} fragment options set as requested"

# --- build and install --------------------------------------------------------
msg "building vmlinux and bzImage with -j$jobs (log: $log)"
start=$SECONDS
run_logged kmake -j"$jobs" vmlinux bzImage
msg "built in $((SECONDS - start)) s"

for f in vmlinux:vmlinux arch/x86/boot/bzImage:bzImage .config:config System.map:System.map; do
  cp "$out/${f%%:*}" "$guest_dir/${f##*:}.tmp"
  mv -f "$guest_dir/${f##*:}.tmp" "$guest_dir/${f##*:}"
done
echo "$hash" >"$stamp"
msg "installed the $variant kernel ($src_pkg $src_ver)"
print_outputs
