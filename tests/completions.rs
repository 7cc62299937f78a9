//! `canopy completions SHELL` through the real binary: the scripts parse, and bash's
//! completes subcommands and flags from the clap definitions.

mod common;

use std::process::Command;

use common::CANOPY;

fn script(shell: &str) -> String {
    let out = Command::new(CANOPY)
        .args(["completions", shell])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What bash completes for the words of `line` (the last one is being typed).
fn bash_complete(line: &str) -> Vec<String> {
    let words: Vec<&str> = line.split(' ').collect();
    let prog = format!(
        "source <({CANOPY} completions bash)\nCOMP_WORDS=({})\nCOMP_CWORD={}\nCOMP_LINE='{line}'\nCOMP_POINT=${{#COMP_LINE}}\n_canopy canopy '{}' '{}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"",
        words.iter().map(|w| format!("'{w}'")).collect::<Vec<_>>().join(" "),
        words.len() - 1,
        words[words.len() - 1],
        words[words.len() - 2],
    );
    let out = Command::new("bash").arg("-c").arg(prog).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .collect()
}

#[test]
fn completion_scripts_generate_for_bash_zsh_and_fish() {
    assert!(script("zsh").starts_with("#compdef canopy"));
    assert!(script("fish").contains("complete -c canopy"));
    assert!(script("bash").contains("_canopy()"));
    let out = Command::new(CANOPY)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    if Command::new("bash").arg("--version").output().is_err() {
        eprintln!("bash is not installed: completion behaviour not checked");
        return;
    }
    let subcommands = bash_complete("canopy wa");
    assert!(
        subcommands.contains(&"watch".to_string()),
        "{subcommands:?}"
    );
    let flags = bash_complete("canopy watch --");
    for f in [
        "--exec",
        "--min-interval",
        "--retries",
        "--once",
        "--api",
        "--json",
    ] {
        assert!(flags.contains(&f.to_string()), "{f} missing from {flags:?}");
    }
    let shells = bash_complete("canopy completions ");
    for s in ["bash", "zsh", "fish"] {
        assert!(
            shells.contains(&s.to_string()),
            "{s} missing from {shells:?}"
        );
    }
}

/// The man pages and completions come from the library's definitions; the binaries must
/// parse exactly those, so their `--help` is the same text.
#[test]
fn the_binaries_use_the_library_definitions() {
    use clap::CommandFactory;
    for (bin, mut cmd) in [
        (common::CANOPY, canopy::tool::Cli::command()),
        (common::CORE_NODE, canopy::cli::CoreNodeCli::command()),
        (common::RELAY_NODE, canopy::cli::RelayNodeCli::command()),
    ] {
        let out = Command::new(bin).arg("--help").output().unwrap();
        let help = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            help.trim_end(),
            cmd.render_help().to_string().trim_end(),
            "{bin}"
        );
    }
}
