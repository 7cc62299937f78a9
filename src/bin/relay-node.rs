//! `relay-node`: a Canopy relay, which follows the committed stream and relays it.

fn main() -> std::process::ExitCode {
    canopy::cli::relay_node_main()
}
