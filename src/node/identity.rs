//! This node's certificate over time: its expiry, reloading it without a restart, and
//! forgetting core signers whose certificate expired.
//!
//! Invariants: after a reload, new connections present the new certificate and trust the new
//! CA at once; a core node's children learn its new certificate (a `Signers` frame) before
//! any entry it seals with the new key.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::{error, info};

use crate::replica::Trust;
use crate::tls::{self, Identity};
use crate::trust::{Sealer, Verifier};

use super::downstream::dispatch;
use super::error::NodeError;
use super::shared::Shared;

/// How often the expiry of this node's certificate and of the signers it knows is looked at.
const CHECK: Duration = Duration::from_secs(60);

/// Keeps `canopy_cert_expiry_seconds` current, says loudly when this node's certificate has
/// expired, and forgets expired signers, until shutdown.
pub(crate) async fn watch(shared: Arc<Shared>) {
    loop {
        let now = SystemTime::now();
        let until = shared.identity.lock().not_after();
        let left = until
            .duration_since(now)
            .map(|d| d.as_secs_f64())
            .unwrap_or_else(|e| -e.duration().as_secs_f64());
        shared.metrics.cert_expiry_seconds.set(left);
        if left <= 0.0 {
            error!(node = %shared.cfg.name, "this node's certificate expired {:.0} s ago: peers refuse it; issue a new one and send SIGHUP", -left);
        }
        shared.state.lock().replica.expire_signers(now);
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(CHECK) => {}
        }
    }
}

/// Puts `id` in place of this node's identity (see [`super::Node::reload_identity`]).
pub(crate) fn reload(shared: &Shared, id: Arc<Identity>) -> Result<(), NodeError> {
    if id.name != shared.cfg.name || id.role != shared.role {
        return Err(NodeError::Identity(format!(
            "the new certificate is for {} ({}); this node is {} ({})",
            id.name, id.role, shared.cfg.name, shared.role
        )));
    }
    let tc = shared.cfg.transport();
    let server = tls::server_config(&id, &tc).map_err(|e| NodeError::Identity(e.to_string()))?;
    let client = tls::client_config(&id, &tc).map_err(|e| NodeError::Identity(e.to_string()))?;
    let verifier = Verifier::new(id.clone());
    let trust = if shared.cfg.is_core() {
        let sealer = Sealer::new(&id)
            .map_err(|e| NodeError::Identity(e.to_string()))?
            .chained(shared.cfg.stream.chain_seals);
        Trust::Sign { sealer, verifier }
    } else {
        Trust::Verify(verifier)
    };
    shared.endpoint.set_server_config(Some(server));
    *shared.client_config.lock() = Some(client);
    super::net::drop_sampled(shared);
    {
        let mut st = shared.state.lock();
        let events = st.replica.reload_trust(trust, SystemTime::now());
        dispatch(shared, &mut st, events);
    }
    let until = id.not_after();
    *shared.identity.lock() = id;
    let days = until
        .duration_since(SystemTime::now())
        .map(|d| d.as_secs() / 86400)
        .unwrap_or(0);
    info!(node = %shared.cfg.name, days_left = days, "reloaded the certificate and the CA");
    Ok(())
}
