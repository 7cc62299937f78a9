//! What the bench binaries that run Canopy relays in their own process share: starting one.

use canopy::config::{NodeConfig, NodeKind, StreamConfig};

/// Starts relay `name` on ephemeral loopback ports: its certificate from `tls`, its data
/// under `data/<name>`, joining `join`.
pub async fn start(
    name: &str,
    tls: &std::path::Path,
    data: &std::path::Path,
    join: Vec<String>,
    stream: StreamConfig,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<canopy::node::Node> {
    let id = canopy::tls::Identity::load(tls, name)?;
    let endpoint = canopy::tls::endpoint("127.0.0.1:0".parse()?, &id, &stream.transport())?;
    let advertise = endpoint.local_addr()?;
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let cfg = NodeConfig {
        name: name.to_string(),
        advertise,
        data: data.join(name),
        file: None,
        kind: NodeKind::Relay { join },
        stream,
        overlay: Default::default(),
        limits: Default::default(),
        api_token_file: None,
        seed: None,
    };
    let id = std::sync::Arc::new(id);
    Ok(canopy::node::Node::start(cfg, id, endpoint, api, shutdown).await?)
}
