//! What the etcd-facing bench binaries share: the gateway's base URL, range ends, opening a watch, and watch stream framing.

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

/// Opens a watch stream on every key with `prefix` through the gateway at `url`.
pub async fn open_watch(
    client: &reqwest::Client,
    url: &str,
    prefix: &str,
) -> anyhow::Result<reqwest::Response> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let body = serde_json::json!({"create_request": {
        "key": b64.encode(prefix.as_bytes()),
        "range_end": b64.encode(prefix_end(prefix.as_bytes())),
    }});
    Ok(client
        .post(format!("{url}/v3/watch"))
        .json(&body)
        .send()
        .await?
        .error_for_status()?)
}

/// Takes the whole watch messages off the front of `buf` (the gateway streams JSON objects
/// back to back over one response); a message cut off at the end stays for the next read.
pub fn take_messages(buf: &mut Vec<u8>) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut consumed = 0;
    let mut stream = serde_json::Deserializer::from_slice(buf).into_iter::<serde_json::Value>();
    let mut msgs = Vec::new();
    loop {
        match stream.next() {
            Some(Ok(v)) => {
                consumed = stream.byte_offset();
                msgs.push(v);
            }
            Some(Err(e)) if e.is_eof() => break,
            Some(Err(e)) => anyhow::bail!("bad watch message: {e}"),
            None => break,
        }
    }
    buf.drain(..consumed);
    Ok(msgs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_framing() {
        assert_eq!(prefix_end(b"a/"), b"a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(base("127.0.0.1:2379/"), "http://127.0.0.1:2379");
        let mut buf = br#"{"a":1}{"b":2}{"c":"#.to_vec();
        let msgs = take_messages(&mut buf).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(buf, br#"{"c":"#.to_vec());
    }
}
