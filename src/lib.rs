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
pub mod measure;
pub mod merkle;
pub mod metrics;
pub mod node;
pub mod overlay;
pub mod replica;
pub mod tls;
pub mod tool;
pub mod transfer;
pub mod transport;
pub mod trust;
pub mod update;
pub mod watch;
pub mod wire;
