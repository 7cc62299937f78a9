//! Core signatures in a replica: a core seals the states it serves, every node learns and forgets
//! signer certificates, and a local copy is trusted only under a seal that covers it.

use super::*;

impl Replica {
    /// Core nodes: signs the current state (after it was installed rather than applied).
    pub(super) fn sign_state(&mut self) {
        if let Trust::Sign { sealer, .. } = &self.trust {
            let anchor = Anchor {
                version: self.file.version(),
                length: self.file.len(),
                chunk_size: self.file.chunk_size(),
                root: self.file.root(),
                commit_time_us: self.last_commit_time_us,
                entry: None,
                prev: None,
            };
            self.anchor = sealer.seal(&anchor).ok().map(|s| (s, None));
        }
    }

    /// The signers this node checks seals against (none without trust).
    pub fn verifier(&self) -> Option<&Verifier> {
        self.trust.verifier()
    }

    /// The core's seal over the version shown (for a snapshot's begin, or a sidecar).
    pub fn anchor(&self) -> Option<&Sealed> {
        self.anchor.as_ref()
    }

    /// The core signer certificates this node knows (its own, on a core node): what a child
    /// needs to verify the seals this node forwards.
    pub fn signer_certs(&self) -> Vec<Bytes> {
        let mut certs = Vec::new();
        if let Trust::Sign { sealer, .. } = &self.trust {
            certs.push(sealer.cert().clone());
        }
        if let Some(v) = self.trust.verifier() {
            for c in v.certs() {
                if !certs.contains(&c) {
                    certs.push(c);
                }
            }
        }
        certs
    }

    /// Checks and keeps signer certificates (from `SubscribeOk.signers` or a `Signers`
    /// frame) at `now`. Returns the ones that were new, to pass on to children first, and the
    /// ones refused with why (a parent may pass on an expired one; it is not used).
    pub fn learn_signers(
        &mut self,
        certs: &[Bytes],
        now: SystemTime,
    ) -> (Vec<Bytes>, Vec<TrustError>) {
        let (mut new, mut refused) = (Vec::new(), Vec::new());
        let verifier = match &mut self.trust {
            Trust::Sign { verifier, .. } | Trust::Verify(verifier) => verifier,
            #[cfg(test)]
            Trust::Unchecked => return (new, refused),
        };
        for c in certs.iter().take(crate::trust::MAX_SIGNERS) {
            match verifier.learn(c, now) {
                Ok(true) => new.push(c.clone()),
                Ok(false) => {}
                Err(e) => refused.push(e),
            }
        }
        (new, refused)
    }

    /// Takes a new identity's trust (a reloaded certificate or CA) at `now`: the signers learnt
    /// so far are checked again under it (those that no longer verify are dropped), and a core
    /// node signs from now on with its new key. Carry out the returned events: a core node's
    /// children learn its new certificate before anything it signs with it.
    pub fn reload_trust(&mut self, trust: Trust, now: SystemTime) -> Vec<Event> {
        let known = self.signer_certs();
        self.trust = trust;
        let _ = self.learn_signers(&known, now);
        match &self.trust {
            Trust::Sign { sealer, .. } => {
                let frame = wire::encode(&proto::Downstream {
                    kind: Some(Down::Signers(proto::Signers {
                        certs: vec![sealer.cert().clone()],
                    })),
                });
                self.sign_state();
                vec![Event::Broadcast(frame)]
            }
            _ => Vec::new(),
        }
    }

    /// Forgets signers whose certificate has expired at `now`.
    pub fn expire_signers(&mut self, now: SystemTime) {
        match &mut self.trust {
            Trust::Sign { verifier, .. } | Trust::Verify(verifier) => verifier.expire(now),
            #[cfg(test)]
            Trust::Unchecked => {}
        }
    }

    /// Checks that `sealed` is a core's signature over `file`'s state. True without trust.
    pub(super) fn covers(&self, sealed: &Sealed, file: &ChunkedFile) -> Result<(), ReplicaError> {
        let Some(verifier) = self.trust.verifier() else {
            return Ok(());
        };
        let (seal, entry) = sealed;
        let anchor = Anchor::of_seal(seal, *entry).map_err(untrusted)?;
        verifier.verify(&anchor, seal).map_err(untrusted)?;
        if (
            anchor.version,
            anchor.length,
            anchor.chunk_size,
            anchor.root,
        ) != (file.version(), file.len(), file.chunk_size(), file.root())
        {
            return Err(unsealed_error(
                "anchor_mismatch",
                format!(
                    "the core's seal is for version {} root {}, not this state (version {})",
                    anchor.version,
                    hex::encode(&anchor.root[..8]),
                    file.version()
                ),
            ));
        }
        Ok(())
    }
}
