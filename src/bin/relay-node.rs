//! `relay-node`: a Canopy relay, which follows the committed stream and relays it.
//!
//! Its tokio runtime has [`DEFAULT_WORKERS`] worker threads unless `TOKIO_WORKER_THREADS`
//! sets another count (tokio reads it when the runtime is built).

/// Worker threads of a relay when `TOKIO_WORKER_THREADS` is not set. 1, not one per core:
/// a relay is one process among many on a fleet host, and an idle one should cost that host
/// nothing. With two workers every packet or timer woke one thread and then the other (the
/// first hands the ready task over): half of an idle relay's wake-ups and a fifth of its
/// CPU (docs/benchmarks.md, "Idle relay cost"). Writing `--file` runs on a thread of its own
/// (`canopy-materialize`, at `materialize.nice`), which this does not limit.
const DEFAULT_WORKERS: &str = "1";

fn main() -> std::process::ExitCode {
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        std::env::set_var("TOKIO_WORKER_THREADS", DEFAULT_WORKERS);
    }
    canopy::cli::relay_node_main()
}
