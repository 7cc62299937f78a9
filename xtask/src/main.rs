//! `cargo xtask`: generated files that come from the clap definitions of the binaries.
//!
//! - `cargo xtask man [DIR]`: one man page per binary and subcommand (default `target/man`);
//! - `cargo xtask completions [DIR]`: `canopy.bash`, `_canopy` (zsh) and `canopy.fish`
//!   (default `target/completions`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use canopy::tool::Shell;

const USAGE: &str = "usage: cargo xtask man [DIR] | cargo xtask completions [DIR]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = |default: &str| {
        args.get(1)
            .map(PathBuf::from)
            .unwrap_or_else(|| target_dir().join(default))
    };
    let result = match args.first().map(String::as_str) {
        Some("man") => man(&dir("man")),
        Some("completions") => completions(&dir("completions")),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(files) => {
            let mut out = std::io::stdout().lock();
            for f in files {
                if writeln!(out, "{}", f.display()).is_err() {
                    break;
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `$CARGO_TARGET_DIR`, or `target/` of the workspace.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

fn man(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    canopy::tool::write_man_pages(dir)
}

fn completions(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for (shell, name) in [
        (Shell::Bash, "canopy.bash"),
        (Shell::Zsh, "_canopy"),
        (Shell::Fish, "canopy.fish"),
    ] {
        let path = dir.join(name);
        let mut out = Vec::new();
        canopy::tool::write_completions(shell, &mut out);
        std::fs::write(&path, out)?;
        written.push(path);
    }
    Ok(written)
}
