//! Canopy: one large file kept byte-identical on thousands of hosts.

pub mod proto {
    //! Wire types generated from `proto/canopy.proto`.
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/canopy.v1.rs"));
}

pub mod api;
mod backfill;
pub mod cli;
pub mod config;
pub mod consensus;
pub mod demo;
pub mod fetch;
pub mod file;
pub mod measure;
pub mod metrics;
pub mod node;
pub mod overlay;
pub mod replica;
pub mod tls;
pub mod upstream;
pub mod wire;
