//! `core-node`: a member of Canopy's Raft core, which orders every change to the file.

fn main() -> std::process::ExitCode {
    canopy::cli::core_node_main()
}
