//! Chaos runs of Canopy: real `core-node` and `relay-node` processes behind a seeded UDP fault
//! proxy, writers and samplers recording a history, seeded kills, pauses, partitions, packet
//! faults and a full disk, and a checker of that history and of the final copies.
//!
//! Invariants: the crate drives the binaries only through their command line, HTTP API,
//! files and signals (it does not link the canopy library); one seed replays one fault
//! schedule; a run never relaxes the properties on acknowledged writes, versions and roots,
//! only the convergence limit is the caller's.

pub mod check;
pub mod cluster;
pub mod layout;
pub mod plan;
pub mod proxy;
mod run;

pub use cluster::Bins;
pub use run::{run, Config, Report};
