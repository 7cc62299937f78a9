//! The `canopy` CLI against real nodes: put (50 MB), cat, patch, truncate, status, a refusal.

mod common;

use std::process::Command;

use common::*;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn cli(api: std::net::SocketAddr, args: &[&str]) -> Vec<u8> {
    let out = Command::new(CANOPY)
        .arg("--api")
        .arg(api.to_string())
        .env("CANOPY_API_TOKEN", TOKEN)
        .args(args)
        .output()
        .expect("run canopy");
    assert!(
        out.status.success(),
        "canopy {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_round_trip_with_a_50_mb_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(root);
    pki.issue("core", "core");
    pki.issue("r1", "relay");
    pki.issue("r2", "relay");
    let core = Proc::start(root, &pki, "core", true, &[], &["--fanout", "1"]);
    let c = http();
    wait_leader(&c, &core).await;
    let r1 = Proc::start(root, &pki, "r1", false, &[core.quic], &[]);
    let r2 = Proc::start(root, &pki, "r2", false, &[r1.quic], &[]);

    // A request the node refuses: one line naming why, exit 4 (`canopy --help`).
    let out = Command::new(CANOPY)
        .args(["--api", &r1.api.to_string(), "core", "members"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("refused the request") && stderr.contains("not a core node"));

    let mut model = vec![0u8; 50_000_000];
    ChaCha8Rng::seed_from_u64(3).fill_bytes(&mut model);
    let input = root.join("input.bin");
    std::fs::write(&input, &model).unwrap();
    let out = cli(r2.api, &["--json", "put", input.to_str().unwrap()]);
    let reply: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let v = reply["version"].as_u64().unwrap();
    assert_eq!(
        cli(r2.api, &["cat"]),
        model,
        "read-your-writes after a 50 MB put"
    );

    let piece = root.join("piece.bin");
    std::fs::write(&piece, b"patched by the cli").unwrap();
    cli(
        r1.api,
        &["patch", "--offset", "49999990", piece.to_str().unwrap()],
    );
    model.truncate(49_999_990);
    model.extend_from_slice(b"patched by the cli");
    cli(core.api, &["truncate", "40000000"]);
    model.truncate(40_000_000);

    let status: serde_json::Value = serde_json::from_slice(&cli(core.api, &["status"])).unwrap();
    let final_version = status["version"].as_u64().unwrap();
    assert!(final_version > v);
    assert_eq!(status["length"], 40_000_000);
    for p in [&core, &r1, &r2] {
        wait_until(60, &format!("{} to converge", p.name), || async {
            version_root(&c, p).await.map(|(v, _)| v) == Some(final_version)
        })
        .await;
        assert!(cli(p.api, &["cat"]) == model, "{} differs", p.name);
        wait_until(60, &format!("{}'s --file", p.name), || async {
            std::fs::read(&p.file).map(|b| b == model).unwrap_or(false)
        })
        .await;
    }
    let s: serde_json::Value = serde_json::from_slice(&cli(r2.api, &["status"])).unwrap();
    assert_eq!(s["root"], status["root"]);
    assert_eq!(s["depth"], 2);
}

/// `put` draws a progress bar (bytes, rate, ETA) when stderr is a terminal, and prints one
/// plain line when it is not; `--json` prints one object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_shows_progress_on_a_terminal_and_one_line_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(root);
    pki.issue("core", "core");
    let core = Proc::start(root, &pki, "core", true, &[], &[]);
    wait_leader(&http(), &core).await;
    let input = root.join("input.bin");
    let mut data = vec![0u8; 20_000_000];
    ChaCha8Rng::seed_from_u64(5).fill_bytes(&mut data);
    std::fs::write(&input, &data).unwrap();
    let api = core.api.to_string();

    let plain = String::from_utf8(cli(core.api, &["put", input.to_str().unwrap()])).unwrap();
    assert_eq!(plain.lines().count(), 1, "{plain}");
    assert!(
        plain.starts_with("version ") && plain.contains("19.07 MiB in"),
        "{plain}"
    );

    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("script(1) is not installed: the terminal case is not checked");
        return;
    }
    data[0] ^= 1;
    std::fs::write(&input, &data).unwrap();
    let line = format!("{CANOPY} --api {api} put {}", input.display());
    let out = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .env("COLUMNS", "100")
        .env("CANOPY_API_TOKEN", TOKEN)
        .output()
        .unwrap();
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{tty}");
    assert!(
        tty.contains("put [") && tty.contains("/19.07 MiB") && tty.contains("eta"),
        "a progress bar with bytes, total, rate and ETA: {tty}"
    );
    assert!(tty.contains("MiB/s"), "{tty}");
    assert!(tty.contains("version "), "{tty}");
}

/// `--version` says whether the binary is a test build, and `bench/check-bins` refuses one:
/// the test profile puts its unoptimized binaries in `target/release`, where the benches
/// look for release ones.
#[test]
fn version_says_how_it_was_built_and_the_benches_refuse_a_test_build() {
    let bin = std::path::Path::new(RELAY_NODE);
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .expect("run relay-node");
    assert!(out.status.success());
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(version.starts_with("relay-node "), "{version}");
    assert_eq!(
        version.contains("(test build: unoptimized, debug assertions on; not for measuring)"),
        cfg!(debug_assertions),
        "{version}"
    );
    assert_eq!(
        version.contains("(optimized)"),
        !cfg!(debug_assertions),
        "{version}"
    );

    let check = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/bench/check-bins"))
        .arg(bin.parent().unwrap())
        .arg("relay-node")
        .output()
        .expect("run bench/check-bins");
    assert_eq!(check.status.success(), !cfg!(debug_assertions));
    if cfg!(debug_assertions) {
        let why = String::from_utf8_lossy(&check.stderr);
        assert!(why.contains("is not an optimized build"), "{why}");
    }
}
