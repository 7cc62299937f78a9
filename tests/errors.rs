//! What a new user meets when something is wrong: every failure below is run through the
//! real binaries and must print one line on stderr that names the fix, with the exit code
//! documented in `--help`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::process::Command;

use common::*;

/// Runs `cmd`; returns (exit code, the one stderr line). Fails if stderr has more lines, or
/// if the process is still running after 30 s (it should have refused to start).
fn one_line_failure(cmd: &mut Command) -> (i32, String) {
    let err = tempfile::NamedTempFile::new().unwrap();
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(err.reopen().unwrap())
        .spawn()
        .expect("run");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} still runs after 30 s instead of refusing to start:\n{}",
                std::fs::read_to_string(err.path()).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(err.path())
        .unwrap()
        .trim()
        .to_string();
    let code = status.code().expect("an exit code");
    assert_ne!(code, 0, "{cmd:?} succeeded: {stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "{cmd:?}: expected one line on stderr, got:\n{stderr}"
    );
    assert!(stderr.starts_with("error: "), "{stderr}");
    (code, stderr)
}

/// A node command line with fresh addresses under `root`; `set` replaces flags' values.
fn node(bin: &str, root: &Path, tls: &Path, name: &str, set: &[(&str, &Path)]) -> Command {
    let udp = free_udp();
    let mut flags: Vec<(&str, std::ffi::OsString)> = vec![
        ("--name", name.into()),
        ("--listen", udp.to_string().into()),
        ("--api", free_tcp().to_string().into()),
        ("--data", root.join("data").join(name).into()),
        ("--tls", tls.into()),
    ];
    if bin == RELAY_NODE {
        flags.push(("--join", "127.0.0.1:9".into()));
    }
    for (flag, value) in set {
        match flags.iter_mut().find(|(f, _)| f == flag) {
            Some(slot) => slot.1 = value.into(),
            None => flags.push((flag, value.into())),
        }
    }
    let mut c = Command::new(bin);
    for (f, v) in flags {
        c.arg(f).arg(v);
    }
    c
}

fn canopy_cmd(api: &str) -> Command {
    let mut c = Command::new(CANOPY);
    c.env_remove("CANOPY_API").args(["--api", api]);
    c
}

#[test]
fn node_start_failures_name_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(root);
    pki.issue("c1", "core");
    pki.issue("r1", "relay");

    // A relay certificate on a core node: it must not run as a follower forever.
    let (code, e) = one_line_failure(&mut node(CORE_NODE, root, &pki.tls, "r1", &[]));
    assert_eq!(code, 4, "{e}");
    assert!(
        e.contains("has role relay, but core-node needs a core certificate"),
        "{e}"
    );
    assert!(e.contains("--role core"), "{e}");

    // No certificate for this name.
    let (code, e) = one_line_failure(&mut node(RELAY_NODE, root, &pki.tls, "r2", &[]));
    assert_eq!(code, 4, "{e}");
    assert!(e.contains("canopy cert issue"), "{e}");

    // A certificate from another CA than the ca.pem beside it.
    let other = root.join("other-ca");
    canopy(&["ca", "init", "--out", other.to_str().unwrap()]);
    let mixed = root.join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(other.join("ca.pem"), mixed.join("ca.pem")).unwrap();
    for f in ["r1.pem", "r1.key"] {
        std::fs::copy(pki.tls.join(f), mixed.join(f)).unwrap();
    }
    let (code, e) = one_line_failure(&mut node(RELAY_NODE, root, &mixed, "r1", &[]));
    assert_eq!(code, 4, "{e}");
    assert!(e.contains("must come from the same cluster CA"), "{e}");

    // The API port is taken.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, e) = one_line_failure(&mut node(
        RELAY_NODE,
        root,
        &pki.tls,
        "r1",
        &[("--api", Path::new(&addr))],
    ));
    assert_eq!(code, 3, "{e}");
    assert!(e.contains(&format!("--api {addr}")), "{e}");
    assert!(e.contains("choose another port"), "{e}");

    // The QUIC port is taken.
    let taken_udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken_udp.local_addr().unwrap().to_string();
    let (code, e) = one_line_failure(&mut node(
        RELAY_NODE,
        root,
        &pki.tls,
        "r1",
        &[("--listen", Path::new(&addr))],
    ));
    assert_eq!(code, 3, "{e}");
    assert!(e.contains(&format!("--listen {addr}")), "{e}");

    // --data and --file where nothing can be written.
    let plain = root.join("plain-file");
    std::fs::write(&plain, b"x").unwrap();
    let (code, e) = one_line_failure(&mut node(
        RELAY_NODE,
        root,
        &pki.tls,
        "r1",
        &[("--data", &plain.join("data"))],
    ));
    assert_eq!(code, 5, "{e}");
    assert!(e.contains("--data") && e.contains("give a path"), "{e}");
    let (code, e) = one_line_failure(&mut node(
        RELAY_NODE,
        root,
        &pki.tls,
        "r1",
        &[("--file", &plain.join("table.bin"))],
    ));
    assert_eq!(code, 5, "{e}");
    assert!(e.contains("--file") && e.contains("its directory"), "{e}");
    let (code, e) = one_line_failure(&mut node(
        RELAY_NODE,
        root,
        &pki.tls,
        "r1",
        &[("--file", root)],
    ));
    assert_eq!(code, 5, "{e}");
    assert!(e.contains("is a directory"), "{e}");

    // An API token file that is no token (a 1 MiB file named by mistake).
    let huge = root.join("huge-token");
    std::fs::write(&huge, vec![b'a'; 1 << 20]).unwrap();
    let (code, e) = one_line_failure(&mut node(
        RELAY_NODE,
        root,
        &pki.tls,
        "r1",
        &[("--api-token-file", &huge)],
    ));
    assert_eq!(code, 2, "{e}");
    assert!(
        e.contains("huge-token") && e.contains("over 4096 bytes"),
        "{e}"
    );

    // A config file with a wrong type.
    let bad = root.join("bad.toml");
    std::fs::write(&bad, "name = \"r1\"\nlisten = 5\n").unwrap();
    let (code, e) = one_line_failure(Command::new(RELAY_NODE).arg("--config").arg(&bad));
    assert_eq!(code, 2, "{e}");
    assert!(e.contains("line 2") && e.contains("deploy/"), "{e}");
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
}

/// A relay `r1` run as uid 65534, unprivileged like the `canopy` user of the systemd units:
/// its certificate and a `data` directory it may read and write, under a temp dir it may
/// read, and the `setpriv … relay-node` command with every flag but the caller's own.
/// `None`, with a line saying why, unless this runs as root with `setpriv`.
fn unprivileged_relay() -> Option<(tempfile::TempDir, Command)> {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false);
    let has_setpriv = Command::new("setpriv").arg("--version").output().is_ok();
    if !is_root || !has_setpriv {
        eprintln!("skipped: needs root and setpriv (root: {is_root}, setpriv: {has_setpriv})");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = Pki::new(root);
    pki.issue("r1", "relay");
    set_mode(root, 0o755);
    set_mode(&pki.tls, 0o755);
    set_mode(&pki.tls.join("r1.key"), 0o644);
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    set_mode(&data, 0o777);
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        RELAY_NODE,
    ])
    .args(["--name", "r1", "--join", "127.0.0.1:9", "--listen"])
    .arg(free_udp().to_string())
    .arg("--api")
    .arg(free_tcp().to_string())
    .arg("--tls")
    .arg(&pki.tls)
    .arg("--data")
    .arg(&data);
    Some((dir, cmd))
}

/// As an unprivileged user (the `canopy` user of the systemd units), a `--file` in a
/// directory owned by root is refused at start. Runs only as root with `setpriv`.
#[test]
fn a_file_path_the_service_user_cannot_write_is_refused() {
    let Some((dir, mut cmd)) = unprivileged_relay() else {
        return;
    };
    let root_only = dir.path().join("srv");
    std::fs::create_dir_all(&root_only).unwrap();
    set_mode(&root_only, 0o755);
    cmd.arg("--file").arg(root_only.join("table.bin"));
    let (code, e) = one_line_failure(&mut cmd);
    assert_eq!(code, 5, "{e}");
    assert!(
        e.contains("Permission denied") && e.contains("--file"),
        "{e}"
    );
}

/// A relay whose UDP buffers the kernel caps below `stream.udp_buffer_bytes` (an unprivileged
/// user, over `net.core.rmem_max`) starts anyway and warns once, naming the sysctls and the
/// counter of the drops. Runs only as root with `setpriv`.
#[test]
fn udp_buffers_the_kernel_caps_are_a_warning_that_names_the_fix() {
    let Some((dir, mut cmd)) = unprivileged_relay() else {
        return;
    };
    let rmem_max: u64 = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let ask = rmem_max + 1024 * 1024;
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, format!("[stream]\nudp_buffer_bytes = {ask}\n")).unwrap();
    set_mode(&config, 0o644);

    let err = tempfile::NamedTempFile::new().unwrap();
    let mut child = cmd
        .arg("--config")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(err.reopen().unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let log = loop {
        let log = std::fs::read_to_string(err.path()).unwrap_or_default();
        if log.contains("udp_buffer_bytes asks for") {
            break log;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the relay exited ({status}) instead of warning:\n{log}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no warning about the UDP buffers within 30 s:\n{log}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let still_running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(still_running, "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("udp_buffer_bytes asks for"))
        .unwrap();
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains(&format!("asks for {ask}-byte UDP buffers"))
            && line.contains(&format!("receive {rmem_max} (net.core.rmem_max)"))
            && line.contains("canopy_udp_receive_drops_total"),
        "{line}"
    );
    assert_eq!(
        log.matches("udp_buffer_bytes asks for").count(),
        1,
        "warned more than once:\n{log}"
    );
}

/// Answers every request with `404 Not Found` (a web server that is not a Canopy node).
fn not_canopy() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().take(4) {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let body = "<html>no such page</html>";
            let _ = write!(
                s,
                "HTTP/1.1 404 Not Found\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

#[test]
fn cli_failures_name_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();

    // Nothing listens at --api.
    let nobody = free_tcp().to_string();
    let (code, e) = one_line_failure(canopy_cmd(&nobody).arg("status"));
    assert_eq!(code, 3, "{e}");
    assert!(
        e.contains("no Canopy node answers at") && e.contains("--api"),
        "{e}"
    );

    // --api not given, and nothing at the default address.
    if std::net::TcpStream::connect("127.0.0.1:7070").is_err() {
        let (code, e) =
            one_line_failure(Command::new(CANOPY).env_remove("CANOPY_API").arg("status"));
        assert_eq!(code, 3, "{e}");
        assert!(e.contains("--api was not given"), "{e}");
    }

    // Not an address.
    let (code, e) = one_line_failure(canopy_cmd("localhost").arg("status"));
    assert_eq!(code, 2, "{e}");
    assert!(e.contains("expected HOST:PORT"), "{e}");

    // Something that is not a Canopy node.
    let web = not_canopy().to_string();
    let (code, e) = one_line_failure(canopy_cmd(&web).arg("status"));
    assert_eq!(code, 3, "{e}");
    assert!(
        e.contains("not like a Canopy node") && e.contains("--listen"),
        "{e}"
    );

    // A local file that cannot be read, and a place certificates cannot be written.
    let (code, e) = one_line_failure(canopy_cmd(&nobody).args(["put", "/nonexistent/table.bin"]));
    assert_eq!(code, 6, "{e}");
    assert!(e.contains("/nonexistent/table.bin"), "{e}");
    let plain = root.join("plain-file");
    std::fs::write(&plain, b"x").unwrap();
    let (code, e) = one_line_failure(
        Command::new(CANOPY)
            .args(["ca", "init", "--out"])
            .arg(plain.join("ca")),
    );
    assert_eq!(code, 6, "{e}");
    let (code, e) = one_line_failure(
        Command::new(CANOPY)
            .args(["cert", "issue", "--name", "r1", "--role", "relay", "--ca"])
            .arg(root.join("no-ca"))
            .arg("--out")
            .arg(root.join("tls")),
    );
    assert_eq!(code, 6, "{e}");
    assert!(e.contains("no-ca"), "{e}");

    // The watch flags are checked before anything runs.
    let out = Command::new(CANOPY)
        .args(["watch", "--min-interval", "1s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "--min-interval needs --exec");
    let out = Command::new(CANOPY)
        .args(["watch", "--exec", "true", "--min-interval", "9999h"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn help_lists_the_exit_codes() {
    for bin in [CANOPY, CORE_NODE, RELAY_NODE] {
        let out = Command::new(bin).arg("--help").output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("Exit codes:"), "{bin}: {help}");
        for code in ["  2  ", "  3  ", "  4  ", "  5  "] {
            assert!(help.contains(code), "{bin} --help lacks {code:?}");
        }
    }
}
