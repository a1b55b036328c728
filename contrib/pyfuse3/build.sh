#!/bin/bash
# Build pyfuse3 3.5.0 with symlink and listing caching into the given Python's environment.
#
# pyfuse3 cannot ask the kernel to cache symlink targets, so every path entered
# through `latest/` or a weekday link costs a readlink round trip to the daemon
# (a warm walk through `latest` took 10x the dated name's time; with the cache,
# 1.25x: docs/benchmarks.md, "Entering through latest"). PyPI has no pyfuse3
# wheels, so pip compiles it from this same source anyway; this adds one small
# patch (cache-symlinks.patch, which lets an Operations class set
# `enable_symlink_caching`) before compiling, and a second one
# (cache-listings.patch: an Operations class's `cache_listing(inode)`, asked
# after each opendir, lets the kernel keep that directory's listing in its page
# cache, FOPEN_CACHE_DIR; docs/filesystem.md, "Caching"). Usage: build.sh PYTHON
set -euo pipefail
PY=$1
VERSION=3.5.0
SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --no-binary :all: --no-deps --dest "$work" "pyfuse3==$VERSION" 2> >(grep -v '^WARNING: Location' >&2)
echo "$SHA256  $work/pyfuse3-$VERSION.tar.gz" | sha256sum -c --quiet
tar xzf "$work/pyfuse3-$VERSION.tar.gz" -C "$work"
src="$work/pyfuse3-$VERSION"
patch -s -p1 -d "$src" < "$here/cache-symlinks.patch"
patch -s -p1 -d "$src" < "$here/cache-listings.patch"
rm -f "$src/src/pyfuse3/__init__.c"  # generated from the .pyx: Cython makes it again, patch included
"$PY" -m pip install -q --force-reinstall --no-deps "$src" 2> >(grep -v '^WARNING: Location' >&2)
# Checked without importing it: its dependency trio comes with squashfu's own install, next.
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
grep -q '^symlink_caching = True' "$site/pyfuse3/_pyfuse3.py"
grep -q '^listing_caching = True' "$site/pyfuse3/_pyfuse3.py"
echo "pyfuse3 $VERSION with symlink and listing caching in $site"
