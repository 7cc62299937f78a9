#!/bin/bash
# Builds and runs fault-in-bulk.rs (a scratch crate in a temp dir; needs only libc):
# page faults one at a time against MADV_POPULATE_WRITE, for 50 MiB of 64 KiB frames.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir/src"
cp "$here/fault-in-bulk.rs" "$dir/src/main.rs"
cat > "$dir/Cargo.toml" <<'T'
[package]
name = "fault-in-bulk"
version = "0.1.0"
edition = "2021"
[dependencies]
libc = "0.2"
[workspace]
T
cargo build --release -q --manifest-path "$dir/Cargo.toml"
"$dir/target/release/fault-in-bulk" vec arena-touch arena-step arena-block
