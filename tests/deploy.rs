//! The files under deploy/: the systemd units pass `systemd-analyze verify` (where systemd
//! is installed; otherwise they are parsed and checked for the settings they promise), and
//! the example configs show every key with its default and run real nodes.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn deploy(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(name)
}

const UNITS: [&str; 3] = [
    "canopy-core@.service",
    "canopy-relay.service",
    "canopy-watch@.service",
];

/// `[Section]` -> key -> values, as systemd reads a unit (keys may repeat).
fn parse_unit(text: &str) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut section = String::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("line {}: not KEY=VALUE: {line}", n + 1));
        assert!(!section.is_empty(), "line {}: key outside a section", n + 1);
        out.entry(section.clone())
            .or_default()
            .entry(k.trim().to_string())
            .or_default()
            .push(v.trim().to_string());
    }
    out
}

#[test]
fn units_carry_restart_limits_and_hardening() {
    for unit in UNITS {
        let text = std::fs::read_to_string(deploy(unit)).unwrap();
        let u = parse_unit(&text);
        let svc = &u["Service"];
        let one = |k: &str| {
            svc.get(k)
                .and_then(|v| v.last())
                .unwrap_or_else(|| panic!("{unit}: no {k}"))
                .as_str()
        };
        assert_eq!(one("User"), "canopy", "{unit}");
        assert_eq!(one("Restart"), "on-failure", "{unit}");
        assert_eq!(one("NoNewPrivileges"), "yes", "{unit}");
        assert_eq!(one("ProtectSystem"), "strict", "{unit}");
        assert!(one("ExecStart").starts_with("/usr/local/bin/"), "{unit}");
        assert!(u["Install"].contains_key("WantedBy"), "{unit}");
        if unit != "canopy-watch@.service" {
            assert_eq!(one("LimitNOFILE"), "65536", "{unit}");
            let rw = one("ReadWritePaths");
            assert!(
                rw.contains("/var/lib/canopy") && rw.contains("/srv/canopy"),
                "{unit}"
            );
        }
    }
}

#[test]
fn systemd_analyze_verifies_the_units() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: systemd-analyze is not installed (the units are still parsed by units_carry_restart_limits_and_hardening)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The man pages the units name, generated from the clap definitions as `cargo xtask man` does.
    let man = dir.path().join("man");
    canopy::tool::write_man_pages(&man.join("man1")).unwrap();
    let bins: BTreeMap<&str, &str> = [
        ("/usr/local/bin/core-node", CORE_NODE),
        ("/usr/local/bin/relay-node", RELAY_NODE),
        ("/usr/local/bin/canopy", CANOPY),
    ]
    .into();
    let mut paths = Vec::new();
    for (unit, instance) in [
        ("canopy-core@.service", "canopy-core@c1.service"),
        ("canopy-relay.service", "canopy-relay.service"),
        ("canopy-watch@.service", "canopy-watch@reload-table.service"),
    ] {
        let mut text = std::fs::read_to_string(deploy(unit)).unwrap();
        for (installed, built) in &bins {
            text = text.replace(installed, built);
        }
        let p = dir.path().join(instance);
        std::fs::write(&p, text).unwrap();
        paths.push(p);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .env("MANPATH", &man)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify:\n{stderr}");
    assert!(stderr.trim().is_empty(), "warnings:\n{stderr}");
}

/// Keys and values of a TOML table, as strings.
fn table(v: &toml::Value) -> BTreeMap<String, String> {
    v.as_table()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.to_string()))
        .collect()
}

#[test]
fn example_configs_show_every_tunable_key_with_its_default() {
    let stream = toml::Value::try_from(canopy::config::StreamConfig::default()).unwrap();
    let materialize = toml::Value::try_from(canopy::config::MaterializeConfig::default()).unwrap();
    let mut overlay =
        table(&toml::Value::try_from(canopy::overlay::OverlayConfig::default()).unwrap());
    overlay.remove("fanout");
    for file in ["canopy-core.toml", "canopy-relay.toml"] {
        let text = std::fs::read_to_string(deploy(file)).unwrap();
        let v: toml::Value = toml::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(table(&v["stream"]), table(&stream), "{file} [stream]");
        assert_eq!(table(&v["overlay"]), overlay, "{file} [overlay]");
        assert_eq!(
            table(&v["materialize"]),
            table(&materialize),
            "{file} [materialize]"
        );
        // Every key has a comment on the line(s) just above it.
        let lines: Vec<&str> = text.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let key_line = !l.starts_with('#') && !l.starts_with('[') && l.contains(" = ");
            if key_line {
                assert!(
                    i > 0 && lines[i - 1].starts_with('#'),
                    "{file}:{}: `{l}` has no comment above it",
                    i + 1
                );
            }
        }
    }
    let core: BTreeSet<String> = table(
        &toml::from_str(&std::fs::read_to_string(deploy("canopy-core.toml")).unwrap()).unwrap(),
    )
    .into_keys()
    .collect();
    for k in ["name", "listen", "api", "data", "tls", "peers", "init"] {
        assert!(core.contains(k), "canopy-core.toml lacks {k}");
    }
    let relay: BTreeSet<String> = table(
        &toml::from_str(&std::fs::read_to_string(deploy("canopy-relay.toml")).unwrap()).unwrap(),
    )
    .into_keys()
    .collect();
    for k in ["name", "listen", "api", "data", "tls", "file", "join"] {
        assert!(relay.contains(k), "canopy-relay.toml lacks {k}");
    }
}

/// The example configs run a real core node and relay (addresses and paths overridden by
/// flags, which win over the file), and the relay's file follows a write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_configs_run_real_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(root);
    pki.issue("c1", "core");
    pki.issue("web-17", "relay");
    let core_quic = free_udp();
    let core_api = free_tcp();
    let _core = KillOnDrop(
        Command::new(CORE_NODE)
            .arg("--config")
            .arg(deploy("canopy-core.toml"))
            .args([
                "--listen",
                &core_quic.to_string(),
                "--api",
                &core_api.to_string(),
            ])
            .args(["--peer", &format!("c1={core_quic}")])
            .arg("--data")
            .arg(root.join("c1"))
            .arg("--tls")
            .arg(&pki.tls)
            .arg("--api-token-file")
            .arg(&pki.token)
            .stderr(std::fs::File::create(root.join("c1.log")).unwrap())
            .spawn()
            .unwrap(),
        root.join("c1.log"),
    );
    let relay_api = free_tcp();
    let relay_file = root.join("srv").join("table.bin");
    let relay_quic = free_udp();
    let _relay = KillOnDrop(
        Command::new(RELAY_NODE)
            .arg("--config")
            .arg(deploy("canopy-relay.toml"))
            .args([
                "--listen",
                &relay_quic.to_string(),
                "--api",
                &relay_api.to_string(),
            ])
            .args(["--join", &core_quic.to_string()])
            .arg("--data")
            .arg(root.join("relay"))
            .arg("--tls")
            .arg(&pki.tls)
            .arg("--api-token-file")
            .arg(&pki.token)
            .arg("--file")
            .arg(&relay_file)
            .stderr(std::fs::File::create(root.join("relay.log")).unwrap())
            .spawn()
            .unwrap(),
        root.join("relay.log"),
    );
    let c = http();
    let url = |api: std::net::SocketAddr, p: &str| format!("http://{api}{p}");
    wait_until(60, "the core to lead", || async {
        let s: Option<serde_json::Value> = match c.get(url(core_api, "/v1/status")).send().await {
            Ok(r) => r.json().await.ok(),
            Err(_) => None,
        };
        s.is_some_and(|s| s["role"] == "leader" && s["name"] == "c1")
    })
    .await;
    let v: serde_json::Value = c
        .put(url(core_api, "/v1/file"))
        .body(b"from the example configs".to_vec())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(v["version"].as_u64().is_some(), "{v}");
    wait_until(60, "the relay's --file", || async {
        std::fs::read(&relay_file).is_ok_and(|b| b == b"from the example configs")
    })
    .await;
    let s: serde_json::Value = c
        .get(url(relay_api, "/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s["name"], "web-17");
}

/// A node process, killed on drop; its log is printed if the test failed.
/// The CA rotation of docs/deploy.md: while every node's ca.pem holds the old and the new
/// CA, a node with a certificate from the old CA and one with a certificate from the new CA
/// accept each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_bundle_lets_old_and_new_certificates_meet_during_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (old, new) = (root.join("old-ca"), root.join("new-ca"));
    canopy(&["ca", "init", "--out", old.to_str().unwrap()]);
    canopy(&["ca", "init", "--out", new.to_str().unwrap()]);
    let bundle = [
        std::fs::read_to_string(old.join("ca.pem")).unwrap(),
        std::fs::read_to_string(new.join("ca.pem")).unwrap(),
    ]
    .concat();
    let issue = |ca: &Path, name: &str, role: &str| {
        let staging = root.join(format!("staging-{name}"));
        canopy(&[
            "cert",
            "issue",
            "--ca",
            ca.to_str().unwrap(),
            "--name",
            name,
            "--role",
            role,
            "--out",
            staging.to_str().unwrap(),
        ]);
        let tls = root.join(format!("tls-{name}"));
        std::fs::create_dir_all(&tls).unwrap();
        for f in [format!("{name}.pem"), format!("{name}.key")] {
            std::fs::copy(staging.join(&f), tls.join(&f)).unwrap();
        }
        std::fs::write(tls.join("ca.pem"), &bundle).unwrap();
        tls
    };
    let core_tls = issue(&old, "c1", "core");
    let relay_tls = issue(&new, "r1", "relay");
    let core_quic = free_udp();
    let (core_api, relay_api) = (free_tcp(), free_tcp());
    let _core = KillOnDrop(
        Command::new(CORE_NODE)
            .args(["--name", "c1", "--init", "--listen", &core_quic.to_string()])
            .args(["--api", &core_api.to_string()])
            .arg("--data")
            .arg(root.join("c1"))
            .arg("--tls")
            .arg(&core_tls)
            .stderr(std::fs::File::create(root.join("c1.log")).unwrap())
            .spawn()
            .unwrap(),
        root.join("c1.log"),
    );
    let relay_quic = free_udp();
    let _relay = KillOnDrop(
        Command::new(RELAY_NODE)
            .args(["--name", "r1", "--listen", &relay_quic.to_string()])
            .args([
                "--api",
                &relay_api.to_string(),
                "--join",
                &core_quic.to_string(),
            ])
            .arg("--data")
            .arg(root.join("r1"))
            .arg("--tls")
            .arg(&relay_tls)
            .stderr(std::fs::File::create(root.join("r1.log")).unwrap())
            .spawn()
            .unwrap(),
        root.join("r1.log"),
    );
    let c = http();
    let get = |api: std::net::SocketAddr| {
        let c = c.clone();
        async move {
            c.get(format!("http://{api}/v1/status"))
                .send()
                .await
                .ok()?
                .json::<serde_json::Value>()
                .await
                .ok()
        }
    };
    wait_until(60, "the core to lead", || async {
        get(core_api).await.is_some_and(|s| s["role"] == "leader")
    })
    .await;
    wait_until(
        60,
        "the new-CA relay to attach to the old-CA core",
        || async { get(relay_api).await.is_some_and(|s| s["parent"] == "c1") },
    )
    .await;
}
