//! The recorders of a run's history: the writers and the status samplers.
//!
//! Invariants: a writer's writes are sequential and each goes to a node drawn from the
//! writer's seeded RNG; a failed write is read back from a core before the writer goes on;
//! a sampler records only answers from the process it asked.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use tokio::time::Instant;

use super::shared::{Latest, Shared};
use crate::check::{Sample, WriteRec};
use crate::cluster::{Kind, State};
use crate::layout;

/// Writer `w`: sequential PATCHes of its records through random nodes until told to stop.
pub(super) async fn writer(sh: Arc<Shared>, w: u32) {
    let mut rng = ChaCha8Rng::seed_from_u64(sh.cfg.seed.wrapping_mul(1000).wrapping_add(w as u64));
    let cores = sh.of_kind(Kind::Core);
    for i in 0..sh.layout.writes_per_writer() {
        if sh.stop_writers.load(Ordering::SeqCst) {
            return;
        }
        let node = rng.random_range(0..sh.names.len());
        let offset = sh.layout.offset(w, i);
        let url = format!("http://{}/v1/file?offset={offset}", sh.api(node));
        let invoked_s = sh.now_s();
        let res = sh
            .http
            .patch(url)
            .body(sh.layout.payload(w, i))
            .timeout(sh.cfg.write_timeout)
            .send()
            .await;
        let (version, error) = match res {
            Ok(r) if r.status().is_success() => match r.json::<Value>().await {
                Ok(v) => match v["version"].as_u64() {
                    Some(ver) => (Some(ver), None),
                    None => (None, Some(format!("answer without a version: {v}"))),
                },
                Err(e) => (None, Some(format!("reading the answer: {e}"))),
            },
            Ok(r) => {
                let code = r.status();
                let body = r.text().await.unwrap_or_default();
                (None, Some(format!("{code}: {}", body.trim())))
            }
            Err(e) => (None, Some(error_chain(&e))),
        };
        let done_s = sh.now_s();
        let mut seen_applied = false;
        if version.is_none() {
            let c = cores[rng.random_range(0..cores.len())];
            seen_applied = read_back(&sh, c, offset, &layout::record(w, i)).await;
        }
        sh.writes.lock().unwrap().push(WriteRec {
            writer: w,
            seq: i,
            node: sh.names[node].clone(),
            invoked_s,
            done_s,
            version,
            error,
            seen_applied,
        });
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..150))).await;
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Whether core `c` now holds `record` at `offset`.
async fn read_back(sh: &Shared, c: usize, offset: u64, record: &[u8]) -> bool {
    let url = format!("http://{}/v1/file", sh.api(c));
    let range = format!("bytes={offset}-{}", offset + record.len() as u64 - 1);
    let Ok(r) = sh
        .http
        .get(url)
        .header("Range", range)
        .timeout(Duration::from_secs(2))
        .send()
        .await
    else {
        return false;
    };
    r.bytes().await.is_ok_and(|b| b.as_ref() == record)
}

/// Node `i`'s statuses, by long polls that answer at each new version (or after a second),
/// at most every 100 ms for a relay; core members are followed at every answer.
pub(super) async fn sampler(sh: Arc<Shared>, i: usize) {
    let mut after = 0u64;
    let gap = if sh.kinds[i] == Kind::Core {
        Duration::ZERO
    } else {
        Duration::from_millis(100)
    };
    while !sh.stop_samplers.load(Ordering::SeqCst) {
        let (api, inc, state) = {
            let n = sh.nodes[i].lock().unwrap();
            (n.api, n.incarnation, n.state)
        };
        if state == State::Down {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let asked = Instant::now();
        let url = format!("http://{api}/v1/watch?after={after}&timeout=1");
        let got = match sh
            .http
            .get(url)
            .timeout(Duration::from_secs(3))
            .send()
            .await
        {
            Ok(r) => r.json::<Value>().await.ok(),
            Err(_) => None,
        };
        let Some(s) = got else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if sh.nodes[i].lock().unwrap().incarnation != inc || s["name"] != sh.names[i].as_str() {
            continue;
        }
        let (Some(version), Some(root)) = (s["version"].as_u64(), s["root"].as_str()) else {
            continue;
        };
        after = version;
        sh.samples.lock().unwrap().push(Sample {
            t_s: sh.now_s(),
            node: i,
            incarnation: inc,
            version,
            root: root.to_string(),
            file_version: s["file_version"].as_u64(),
            leader: s["role"] == "leader",
        });
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        sh.latest.lock().unwrap()[i] = Latest {
            parent: s["parent"].as_str().unwrap_or("").to_string(),
            children: strings(&s["children"]),
        };
        let spent = asked.elapsed();
        if spent < gap {
            tokio::time::sleep(gap - spent).await;
        }
    }
}
