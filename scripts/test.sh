#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine with a Rust toolchain. Installs what the
# tests need first (idempotent): fuse3, nginx (HTTP origin), moto_server (S3 origin),
# pyarrow (a real Parquet reader through the mount), curl (the metrics endpoint), man-db
# (the generated man pages rendered), systemd-analyze (the unit file checked),
# kubernetes-validate (the Kubernetes manifests checked against the API's schemas), podman
# (the container image run as three nodes), the repository's Python package (fsspec).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v mkfifo >/dev/null || need+=(coreutils)
command -v curl >/dev/null || need+=(curl)
command -v man >/dev/null || need+=(man-db)
command -v systemd-analyze >/dev/null || need+=(systemd)
# The container test: podman with runc (crun refuses cgroup v1 hosts), its network stack,
# and busybox for the image's shell (scripts/image.sh).
command -v podman >/dev/null || need+=(podman netavark aardvark-dns)
# netavark sets up container networks with iptables, which it only recommends.
command -v iptables >/dev/null || [ -x /usr/sbin/iptables ] || need+=(iptables)
command -v runc >/dev/null || [ -x /usr/sbin/runc ] || need+=(runc)
[ -x /bin/busybox ] || need+=(busybox-static)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # A package's service must not grab ports on the test machine.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi
export PATH="$PATH:/usr/sbin"
pips=()
command -v moto_server >/dev/null || pips+=('moto[server]>=5.0.15')
python3 -c 'import pyarrow' 2>/dev/null || pips+=('pyarrow')
command -v kubernetes-validate >/dev/null || pips+=('kubernetes-validate>=1.31')
if [ ${#pips[@]} -gt 0 ]; then
  echo "installing: ${pips[*]} (S3 server for origin tests; Parquet reader for mount tests; Kubernetes schemas)"
  python3 -m pip install --quiet --disable-pip-version-check "${pips[@]}"
  hash -r
fi
# The repository's Python package (and fsspec with it), as a user installs it.
python3 -m pip install --quiet --disable-pip-version-check ./python
{ command -v moto_server && command -v kubernetes-validate; } >/dev/null || export PATH="$PATH:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"

# Incremental caches only help the next edit-compile cycle; here they cost 2.7 GB and time.
export CARGO_INCREMENTAL=0
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
