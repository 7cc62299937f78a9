//! The live tree page (`GET /ui`) in headless Chromium: loaded from a core of a live cluster
//! (3 cores, 12 relays, fan-out 3) it draws one node element per node of the whole tree; after
//! `kill -9` of a relay with children the node is gone and its children hang below other
//! parents. Screenshots of both go to the test's output folder. A second test renders a
//! synthetic tree of 1000 nodes through the same page and encoder and reports the JSON size
//! and the render time. `canopy tree` from another core member prints the same whole tree
//! (and `--json`), and `canopy core members` each member's role, health and lag.

mod common;
mod tools;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tools::{debian_tool, OpsCluster};

/// Where the screenshots and figures go: `target/tmp/ui`.
fn output_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Headless Chromium with the flags that work on a machine without network access.
fn chromium(profile: &Path, args: &[&str]) -> String {
    let bin = debian_tool("chromium", "chromium");
    let out = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The DOM of `url` once its scripts ran for `budget_ms` of virtual time.
fn dom(profile: &Path, url: &str, budget_ms: u32) -> String {
    chromium(
        profile,
        &[
            &format!("--virtual-time-budget={budget_ms}"),
            "--dump-dom",
            url,
        ],
    )
}

fn screenshot(profile: &Path, url: &str, path: &Path, size: &str) {
    chromium(
        profile,
        &[
            "--virtual-time-budget=6000",
            &format!("--window-size={size}"),
            &format!("--screenshot={}", path.display()),
            url,
        ],
    );
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    assert!(len > 10_000, "screenshot {} is {len} bytes", path.display());
}

/// The drawn nodes: (name, parent, state) of every `<g class="node ...">`.
fn drawn(dom: &str) -> Vec<(String, String, String)> {
    let attr = |tag: &str, a: &str| {
        tag.split(&format!(" {a}=\""))
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("")
            .to_string()
    };
    dom.split("<g class=\"node ")
        .skip(1)
        .map(|t| {
            let tag = t.split('>').next().unwrap_or("");
            (
                attr(tag, "data-name"),
                attr(tag, "data-parent"),
                attr(tag, "data-state"),
            )
        })
        .collect()
}

/// A `data-*` attribute of `<body>`.
fn body_data(dom: &str, name: &str) -> Option<String> {
    let body = dom.split("<body").nth(1)?.split('>').next()?;
    body.split(&format!("data-{name}=\""))
        .nth(1)?
        .split('"')
        .next()
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_page_and_the_cli_show_the_whole_tree_a_kill_and_member_health() {
    let mut cluster = OpsCluster::start(12).await;
    let profile = tempfile::tempdir().unwrap();
    let url = cluster.cores[0].url("/ui");
    let out = output_dir();

    let r = reqwest::get(&url).await.unwrap();
    assert_eq!(r.status(), 200);
    let html = r.text().await.unwrap();
    for external in ["src=\"http", "href=\"http", "@import", "//cdn"] {
        assert!(
            !html.contains(external),
            "the page loads something from outside: {external}"
        );
    }

    let nodes = drawn(&dom(profile.path(), &url, 5000));
    assert_eq!(
        nodes.len(),
        15,
        "one element per node of the cluster: {nodes:?}"
    );
    for p in cluster.all() {
        assert!(
            nodes.iter().any(|(n, ..)| *n == p.name),
            "{} not drawn",
            p.name
        );
    }
    assert!(
        nodes.iter().all(|(.., s)| s == "sync"),
        "a settled cluster is in sync: {nodes:?}"
    );
    screenshot(profile.path(), &url, &out.join("tree.png"), "1000,400");

    let victim = cluster.relay_with_children().await;
    let name = cluster.relays[victim].name.clone();
    let children: Vec<String> = nodes
        .iter()
        .filter(|(_, p, _)| *p == name)
        .map(|(n, ..)| n.clone())
        .collect();
    assert!(!children.is_empty(), "{name} has children on the page");
    cluster.relays[victim].kill();
    cluster.wait_settled(60).await;

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let after = drawn(&dom(profile.path(), &url, 5000));
        let gone = !after.iter().any(|(n, ..)| *n == name);
        let reattached = children.iter().all(|c| {
            after
                .iter()
                .any(|(n, p, _)| n == c && !p.is_empty() && *p != name)
        });
        if after.len() == 14 && gone && reattached {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after killing {name}: {after:?} (its children {children:?})"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    screenshot(
        profile.path(),
        &url,
        &out.join("tree-after-kill.png"),
        "1000,400",
    );
    eprintln!("screenshots in {}", out.display());

    // `canopy tree` from another core member shows the whole tree too, as an outline.
    let api = cluster.cores[1].api.to_string();
    let outline = common::canopy(&["--api", &api, "tree"]);
    eprintln!("{outline}");
    let depth: u32 = outline
        .split("14 nodes, max depth ")
        .nth(1)
        .and_then(|d| d.trim().parse().ok())
        .unwrap_or_else(|| panic!("no summary line:\n{outline}"));
    assert!((2..=4).contains(&depth), "{outline}");
    for p in cluster.all() {
        assert!(
            outline.contains(&format!("{}  v", p.name)),
            "{} missing:\n{outline}",
            p.name
        );
    }
    assert!(!outline.contains(&format!("{name}  v")), "{outline}");
    assert!(
        outline.contains("└─ ") && outline.contains("lag 0"),
        "{outline}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&common::canopy(&["--api", &api, "--json", "tree"])).unwrap();
    let listed = json.as_array().unwrap();
    assert_eq!(listed.len(), 14, "{json}");
    let depth_of = |n: &str| {
        listed
            .iter()
            .find(|x| x["name"] == n)
            .and_then(|x| x["depth"].as_u64())
    };
    for c in &children {
        assert_eq!(depth_of(c).map(|d| d >= 1), Some(true), "{c} in {json}");
    }

    // `core members`: each member's role, health and lag; a stopped member is unreachable.
    let members: serde_json::Value = serde_json::from_str(&common::canopy(&[
        "--api", &api, "--json", "core", "members",
    ]))
    .unwrap();
    let ms = members["members"].as_array().unwrap();
    assert_eq!(ms.len(), 3, "{members}");
    assert_eq!(
        ms.iter().filter(|m| m["role"] == "leader").count(),
        1,
        "{members}"
    );
    assert_eq!(
        ms.iter().filter(|m| m["role"] == "follower").count(),
        2,
        "{members}"
    );
    assert!(
        ms.iter()
            .all(|m| m["health"] == "ok" && m["lag_entries"] == 0),
        "{members}"
    );
    let leader = ms.iter().find(|m| m["role"] == "leader").unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();
    let down = cluster
        .cores
        .iter()
        .position(|p| p.name != leader && p.name != "c2")
        .unwrap();
    cluster.cores[down].kill();
    let table = common::canopy(&["--api", &api, "core", "members"]);
    let row = |n: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{n} ")))
            .unwrap_or_else(|| panic!("no row for {n}:\n{table}"))
            .to_string()
    };
    eprintln!("{table}");
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        row(&cluster.cores[down].name).contains("unreachable"),
        "{table}"
    );
    assert!(
        row(&leader).contains("leader") && row(&leader).contains(" ok "),
        "{table}"
    );
    assert!(row("c2").contains(" ok "), "{table}");
}

/// A synthetic tree of `n` nodes: 3 roots, then each node below the one `fanout` places up.
fn synthetic(n: usize, fanout: usize) -> Vec<canopy::proto::TreeNode> {
    let mut nodes: Vec<canopy::proto::TreeNode> = Vec::with_capacity(n);
    for i in 0..n {
        let (parent, depth) = if i < 3 {
            (String::new(), 0)
        } else {
            let p = &nodes[(i - 3) / fanout];
            (p.name.clone(), p.depth + 1)
        };
        nodes.push(canopy::proto::TreeNode {
            name: format!("relay-{i:04}"),
            addr: format!("10.1.{}.{}:7443", i / 250, i % 250),
            parent,
            depth,
            version: 123_456 - (i % 7 == 0) as u64,
            children: 0,
            lag_entries: (i % 7 == 0) as u64,
        });
    }
    for i in 3..n {
        let p = (i - 3) / fanout;
        nodes[p].children += 1;
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_nodes_render_and_their_json_is_measured() {
    const N: usize = 1000;
    let nodes = synthetic(N, 8);
    let compact = canopy::api::compact_tree("relay-0000", &nodes, Some((3 << 20, 50 << 20)));
    let compact_bytes = serde_json::to_vec(&compact).unwrap().len();
    let full: Vec<serde_json::Value> = nodes
        .iter()
        .map(|n| {
            serde_json::json!({
                "name": n.name, "addr": n.addr, "parent": n.parent, "depth": n.depth,
                "version": n.version, "children": n.children, "lag_entries": n.lag_entries,
            })
        })
        .collect();
    let full_bytes = serde_json::to_vec(&full).unwrap().len();

    // The page as /ui serves it, with the snapshot inlined: its first render runs while the
    // page loads, in real time (Chromium's virtual time, which --dump-dom needs to wait for
    // a poll, stops the clock during scripts).
    let inlined = canopy::api::UI_HTML.replace(
        r#"<script id="initial-tree" type="application/json"></script>"#,
        &format!(
            r#"<script id="initial-tree" type="application/json">{}</script>"#,
            serde_json::to_string(&compact)
                .unwrap()
                .replace("</", "<\\/")
        ),
    );
    assert_ne!(inlined, canopy::api::UI_HTML);
    let app = axum::Router::new()
        .route(
            "/ui",
            axum::routing::get(|| async {
                (
                    [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
                    canopy::api::UI_HTML,
                )
            }),
        )
        .route(
            "/inlined",
            axum::routing::get(move || {
                let page = inlined.clone();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
                        page,
                    )
                }
            }),
        )
        .route(
            "/v1/tree/compact",
            axum::routing::get(move || {
                let body = compact.clone();
                async move { axum::Json(body) }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let url = format!("http://{addr}/ui");
    let profile = tempfile::tempdir().unwrap();
    let blocking = |url: String, budget: Option<u32>| {
        let p = profile.path().to_path_buf();
        tokio::task::spawn_blocking(move || match budget {
            Some(b) => dom(&p, &url, b),
            None => chromium(&p, &["--dump-dom", &url]),
        })
    };
    // Polled as a live page: every node drawn, refreshed.
    let page = blocking(url.clone(), Some(7000)).await.unwrap();
    let drawn = drawn(&page);
    assert_eq!(drawn.len(), N);
    // Every seventh node is one entry behind; relay-0000, the answering node, is receiving a
    // transfer.
    let count = |state: &str| drawn.iter().filter(|(.., s)| s == state).count();
    assert_eq!(count("behind"), N.div_ceil(7) - 1);
    assert_eq!(count("backfill"), 1);
    let renders: u32 = body_data(&page, "renders").unwrap().parse().unwrap();
    assert!(renders >= 2, "the page refreshes: {renders} renders");
    // Render time in real time: the median of 5 loads.
    let mut times = Vec::new();
    for _ in 0..5 {
        let page = blocking(format!("http://{addr}/inlined"), None)
            .await
            .unwrap();
        assert_eq!(body_data(&page, "nodes").as_deref(), Some("1000"));
        times.push(
            body_data(&page, "render-ms")
                .unwrap()
                .parse::<f64>()
                .unwrap(),
        );
    }
    times.sort_by(f64::total_cmp);
    let render_ms = times[2];
    let shot = output_dir().join("tree-1000.png");
    tokio::task::spawn_blocking({
        let (p, u, s) = (profile.path().to_path_buf(), url.clone(), shot.clone());
        move || screenshot(&p, &u, &s, "1200,760")
    })
    .await
    .unwrap();
    let figures = format!(
        "nodes {N}\ncompact JSON (/v1/tree/compact) {compact_bytes} bytes\nfull JSON (/v1/tree) {full_bytes} bytes\nrender {render_ms} ms (median of 5 first renders {times:?}, headless Chromium, layout included)\n"
    );
    std::fs::write(output_dir().join("figures-1000.txt"), &figures).unwrap();
    eprintln!("{figures}");
    assert!(compact_bytes < full_bytes / 2, "{figures}");
}
