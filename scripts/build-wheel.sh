#!/usr/bin/env bash
# Builds the pip wheel (both binaries, torchrun-rs and torchrun-rs-store, and
# the small torchrun_rs Python package) into dist/. manylinux2014 through
# zig: installs on every mainstream GPU distribution (glibc 2.17+), no Docker.
# The build tools live in a cached venv under ~/.cache/torchrun-rs.
# Prints the wheel's path on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${TORCHRUN_RS_CACHE:-$HOME/.cache/torchrun-rs}"
TOOLS="$CACHE/venv-wheel-tools"
if [ ! -f "$TOOLS/.complete" ]; then
  rm -rf "$TOOLS"
  python3 -m venv "$TOOLS" >&2
  "$TOOLS/bin/python" -m pip install -q --disable-pip-version-check "maturin>=1.16,<2" "ziglang>=0.13" >&2
  touch "$TOOLS/.complete"
fi
rm -rf dist
PATH="$TOOLS/bin:$PATH" "$TOOLS/bin/maturin" build --release --zig --compatibility manylinux2014 --out dist >&2
ls "$PWD"/dist/*.whl
