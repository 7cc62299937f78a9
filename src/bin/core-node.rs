//! `core-node`: a member of Canopy's Raft core, which orders every change to the file.

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "A Canopy core node: orders every change and streams it to the tree"
)]
struct Args {
    #[command(flatten)]
    node: canopy::cli::NodeArgs,
    /// Form a one-member cluster on first start (harmless if already initialized).
    #[arg(long)]
    init: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    canopy::cli::node_main(args.node, canopy::cli::Role::Core { init: args.init })
}
