//! Canopy: one large file kept byte-identical on thousands of hosts.

pub mod proto {
    //! Wire types generated from `proto/canopy.proto`.
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/canopy.v1.rs"));
}

pub mod api;
pub mod cli;
pub mod config;
pub mod consensus;
pub mod dedup;
pub mod demo;
pub mod fetch;
pub mod file;
pub mod fixed_base;
pub mod measure;
pub mod merkle;
pub mod metrics;
pub mod node;
pub mod overlay;
pub mod prefault;
pub mod replica;
pub mod runtime;
pub mod tls;
pub mod tool;
pub mod transfer;
pub mod transport;
pub mod trust;
pub mod udp;
pub mod update;
pub mod watch;
pub mod wire;

/// What `--version` prints: the version, and whether this code was compiled as a test build.
///
/// `cargo test --workspace --profile bench` (the README's test command) compiles this crate
/// unoptimized with debug assertions and puts its binaries in `target/release`, over the
/// release ones, until the next `cargo build --release`. The benches refuse a binary whose
/// version says "test build" (`bench/check-bins`).
pub const VERSION: &str = if TEST_BUILD {
    concat!(
        env!("CARGO_PKG_VERSION"),
        " (test build: unoptimized, debug assertions on; not for measuring)"
    )
} else {
    concat!(env!("CARGO_PKG_VERSION"), " (optimized)")
};

/// Whether this crate was compiled with debug assertions, as the test profile compiles it.
pub const TEST_BUILD: bool = cfg!(debug_assertions);
