#!/usr/bin/env bash
# Builds the container image `shoal:latest` (podman) without a registry or a base image:
# a root filesystem of the shoal binary, the shared libraries `ldd` lists, busybox (sh and
# the few tools the Kubernetes mounter's script and probes use) and the CA certificates
# (HTTPS origins), imported with `podman import`.
#
#   bash scripts/image.sh                 # release build, image shoal:latest
#   bash scripts/image.sh --save shoal.tar  # and a docker-archive to `ctr images import` / `docker load`
#   SHOAL_BIN=target/debug/shoal SHOAL_IMAGE=shoal:test bash scripts/image.sh  # a given binary and tag
#
# Installs podman, runc and busybox-static first if missing (apt; idempotent). Run the image
# with `--runtime runc` where crun refuses the machine's cgroup layout, and with
# `--device /dev/fuse --cap-add SYS_ADMIN` to mount.
set -euo pipefail
cd "$(dirname "$0")/.."

save=""
while [ $# -gt 0 ]; do
  case "$1" in
    --save) save="$2"; shift 2 ;;
    *) echo "usage: $0 [--save FILE.tar]" >&2; exit 2 ;;
  esac
done
image="${SHOAL_IMAGE:-shoal:latest}"

need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || [ -x /usr/sbin/runc ] || need+=(runc)
command -v iptables >/dev/null || [ -x /usr/sbin/iptables ] || need+=(iptables)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx sh || need+=(busybox-static)
[ -f /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" netavark aardvark-dns >/dev/null
fi

bin="${SHOAL_BIN:-}"
if [ -z "$bin" ]; then
  cargo build --release --locked -p shoal-cli
  bin=target/release/shoal
fi
[ -x "$bin" ] || { echo "error: no shoal binary at $bin" >&2; exit 1; }

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,usr/local/bin,etc/ssl/certs,tmp,var/lib/shoal,dev,proc,sys,root}
chmod 1777 "$root/tmp"
# Without debug info (release builds keep line tables for backtraces: 140 MB -> ~25 MB).
if command -v strip >/dev/null; then
  strip --strip-debug -o "$root/usr/local/bin/shoal" "$bin"
  chmod 0755 "$root/usr/local/bin/shoal"
else
  install -m 0755 "$bin" "$root/usr/local/bin/shoal"
fi
# The libraries the binaries link, at the paths the loader looks for them.
{ ldd "$bin"; ldd /bin/busybox || true; } 2>/dev/null | awk '/=> \// { print $3 } /^[ \t]*\/lib/ { print $1 }' | while read -r lib; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
cp /bin/busybox "$root/bin/busybox"
for tool in sh cat cp ls mkdir sleep umount mount kill ps env; do
  ln -s busybox "$root/bin/$tool"
done
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\n' > "$root/etc/group"

tar -C "$root" --numeric-owner -cf - . | podman import \
  --change 'ENV PATH=/usr/local/bin:/bin' \
  --change 'ENV SHOAL_HOME=/var/lib/shoal' \
  --change 'ENTRYPOINT ["/usr/local/bin/shoal"]' \
  --change 'CMD ["node", "run"]' \
  --message "shoal $("$bin" --version | awk '{print $2}')" \
  - "$image" >/dev/null
echo "built $image ($(podman image inspect "$image" --format '{{.Size}}') bytes)"
if [ -n "$save" ]; then
  podman save --format docker-archive -o "$save" "$image"
  echo "saved $image to $save"
fi
