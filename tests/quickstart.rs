//! docs/quickstart.md is tested: deploy/quickstart-netns.sh runs 3 core nodes and 6 relays,
//! each in its own network namespace and address, writes, and checks that every relay's
//! file converged. Runs where it can (root, `ip`, network namespaces), otherwise says why
//! it skipped.

mod common;

use std::path::Path;
use std::process::Command;

fn skip_reason() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if !uid.stdout.starts_with(b"0\n") {
        return Some("not root (ip netns needs root)".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("`ip` is not installed (apt-get install iproute2)".into());
    }
    let probe = format!("canopy-probe-{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &probe])
        .status()
        .is_ok_and(|s| s.success());
    let _ = Command::new("ip").args(["netns", "del", &probe]).status();
    if !ok {
        return Some("`ip netns add` fails here (no network namespaces in this sandbox)".into());
    }
    None
}

#[test]
fn quickstart_script_converges_across_namespaces() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let bin_dir = Path::new(common::CANOPY).parent().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/quickstart-netns.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("CANOPY_BIN_DIR", bin_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("every relay's --file is byte-identical")
            && stdout.contains("converged at version")
            && stdout.trim_end().ends_with("quickstart: converged"),
        "{stdout}"
    );
    let relays_in_trees = stdout
        .lines()
        .filter(|l| {
            l.trim_start_matches([' ', '│', '├', '└', '─'])
                .starts_with("relay-")
        })
        .count();
    assert_eq!(
        relays_in_trees, 6,
        "every relay is in the tree, once:\n{stdout}"
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("quickstart: namespaces "))
        .expect("the script names its namespaces");
    let run = line.split('-').next().unwrap().to_string();
    let work = line.rsplit("files in ").next().unwrap().trim().to_string();
    let survivors: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&work))
        .collect();
    assert!(
        survivors.is_empty(),
        "the script stopped every node it started: {survivors:?}"
    );
    let left = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let left = String::from_utf8_lossy(&left.stdout);
    assert!(
        !left.lines().any(|l| l.starts_with(&format!("{run}-"))),
        "the script removed its namespaces: {left}"
    );
}
