//! `relay-node`: keeps a verified copy of the file, follows a parent, serves children.

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "A Canopy relay node: follows the committed stream and relays it"
)]
struct Args {
    #[command(flatten)]
    node: canopy::cli::NodeArgs,
    /// Parents to try, in order (core nodes or other relays), as HOST:PORT.
    #[arg(long, value_delimiter = ',')]
    join: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    canopy::cli::node_main(args.node, canopy::cli::Role::Relay { join: args.join })
}
