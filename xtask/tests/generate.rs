//! `cargo xtask man` and `cargo xtask completions` write what they promise, from the real
//! clap definitions, and the results parse.

use std::process::Command;

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

#[test]
fn man_pages_generate_for_every_binary_and_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(XTASK)
        .arg("man")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for page in [
        "canopy.1",
        "canopy-watch.1",
        "canopy-put.1",
        "canopy-completions.1",
        "canopy-core-add.1",
        "core-node.1",
        "relay-node.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page))
            .unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.starts_with(".ie \\n(.g .ds Aq"), "{page} is roff");
        assert!(text.contains(".SH NAME"), "{page}");
    }
    let watch = std::fs::read_to_string(dir.path().join("canopy-watch.1")).unwrap();
    assert!(watch.contains("min\\-interval") && watch.contains("retries"));
    let relay = std::fs::read_to_string(dir.path().join("relay-node.1")).unwrap();
    assert!(
        relay.contains("Exit codes"),
        "the exit codes are in the man page"
    );

    // Where man is installed, the pages render without warnings.
    if Command::new("man").arg("--version").output().is_ok() {
        let out = Command::new("man")
            .args(["--warnings", "-E", "UTF-8", "-l"])
            .arg(dir.path().join("canopy-watch.1"))
            .env("MANWIDTH", "80")
            .env("MAN_KEEP_FORMATTING", "0")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("--exec"), "{text}");
    } else {
        eprintln!("man is not installed: rendering not checked");
    }
}

#[test]
fn completions_generate_and_bash_parses_them() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(XTASK)
        .arg("completions")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bash = std::fs::read_to_string(dir.path().join("canopy.bash")).unwrap();
    assert!(bash.contains("--min-interval") && bash.contains("completions"));
    let zsh = std::fs::read_to_string(dir.path().join("_canopy")).unwrap();
    assert!(zsh.starts_with("#compdef canopy"));
    let fish = std::fs::read_to_string(dir.path().join("canopy.fish")).unwrap();
    assert!(fish.contains("complete -c canopy"));
    for (shell, file) in [
        ("bash", "canopy.bash"),
        ("zsh", "_canopy"),
        ("fish", "canopy.fish"),
    ] {
        match Command::new(shell)
            .arg("-n")
            .arg(dir.path().join(file))
            .output()
        {
            Ok(out) => assert!(
                out.status.success(),
                "{shell} -n {file}: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(_) => eprintln!("{shell} is not installed: {file} not syntax-checked"),
        }
    }
}
