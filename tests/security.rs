//! A real core-node refuses foreign peers and bad frames without disturbing its children.

mod common;

use std::time::Duration;

use common::*;

async fn close_reason(conn: &quinn::Connection) -> String {
    tokio::time::timeout(Duration::from_secs(20), conn.closed())
        .await
        .expect("the node closes the offending connection")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_ca_and_bad_frames_are_refused_and_the_node_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (pki, core, r1, c) = core_and_relay(root).await;
    wait_until(30, "r1 to attach", || async {
        status(&c, &r1).await.is_some_and(|s| s["parent"] == "core")
    })
    .await;

    // A peer whose certificate chains to another CA never gets a connection.
    let foreign_ca = root.join("foreign-ca");
    canopy::tls::ca_init(&foreign_ca).unwrap();
    let foreign = quic_client(root, &foreign_ca, "intruder");
    let attempt = foreign
        .connect(core.quic, canopy::tls::SERVER_NAME)
        .unwrap()
        .await;
    if let Ok(conn) = attempt {
        // TLS 1.3 may finish the client side before the server rejects the certificate.
        let reason = close_reason(&conn).await;
        assert!(!reason.is_empty());
        assert!(conn.open_bi().await.is_err());
    }

    // An oversized frame: only that connection is closed.
    let good = quic_client(root, &pki.ca, "tester");
    let conn = good
        .connect(core.quic, canopy::tls::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let reason = close_reason(&conn).await;
    assert!(reason.contains("bad frame"), "{reason}");

    // A garbage frame (valid length, body not protobuf): same.
    let conn = good
        .connect(core.quic, canopy::tls::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let garbage = [0xffu8; 32];
    send.write_all(&(garbage.len() as u32).to_be_bytes())
        .await
        .unwrap();
    send.write_all(&garbage).await.unwrap();
    let reason = close_reason(&conn).await;
    assert!(reason.contains("bad frame"), "{reason}");

    // The node still commits, and its child still follows.
    let resp = c
        .patch(core.url("/v1/file?offset=0"))
        .body(&b"still serving"[..])
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    let v: serde_json::Value = resp.json().await.unwrap();
    let version = v["version"].as_u64().unwrap();
    wait_until(30, "r1 to apply the write", || async {
        version_root(&c, &r1).await.map(|(v, _)| v) == Some(version)
    })
    .await;
    assert_eq!(status(&c, &r1).await.unwrap()["parent"], "core");
    let text = metrics(&c, &core).await;
    let line = text
        .lines()
        .find(|l| l.starts_with("canopy_frame_errors_total"))
        .expect("frame error counter");
    assert!(line.ends_with(" 2"), "{line}");
    assert!(core.log_text().contains("closing connection"));
}

#[test]
fn bad_flags_and_missing_certs_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(CORE_NODE)
        .args([
            "--name",
            "x",
            "--listen",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
        ])
        .args([
            "--data",
            dir.path().to_str().unwrap(),
            "--tls",
            dir.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error:") && err.contains("ca.pem"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let out = std::process::Command::new(RELAY_NODE)
        .args(["--name", "x", "--listen", "nonsense"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}
