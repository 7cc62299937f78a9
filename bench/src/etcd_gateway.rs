//! What the etcd-facing bench binaries share: the gateway's base URL and range ends.

/// `http://HOST:PORT` for an endpoint given with or without a scheme (no trailing slash).
pub fn base(ep: &str) -> String {
    let ep = ep.trim().trim_end_matches('/');
    if ep.starts_with("http://") || ep.starts_with("https://") {
        ep.to_string()
    } else {
        format!("http://{ep}")
    }
}

/// The smallest key greater than every key with this prefix.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}
