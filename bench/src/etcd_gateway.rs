//! What the etcd-facing bench binaries share: the gateway's base URL, range ends and watch stream framing.

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
