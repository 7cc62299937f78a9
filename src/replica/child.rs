//! The child side of a replica: subscribing, following the parent's stream (entries, seals,
//! checkpoints, heartbeats, transfers), and dropping what an ended stream left unsealed.

use super::*;

impl Replica {
    /// Child side: the `Subscribe` to send on a fresh stream to the parent. With `full`, it
    /// asks for a full transfer (after divergence). Then feed every frame received on that
    /// stream to [`Replica::handle_downstream`].
    pub fn subscribe(&mut self, name: &str, listen_addr: &str, full: bool) -> proto::Subscribe {
        self.name = name.to_string();
        let _ = self.expect_subscribe_ok();
        self.subscription(name, listen_addr, full)
    }

    /// Child side: the `Subscribe` for this node's current position, without changing any
    /// state (for a move, before deciding to switch).
    pub fn subscription(&self, name: &str, listen_addr: &str, full: bool) -> proto::Subscribe {
        let shown = self.file();
        let (have_version, have_root) = if full || !self.synced {
            (0, Bytes::new())
        } else {
            (shown.version(), Bytes::copy_from_slice(&shown.root()))
        };
        proto::Subscribe {
            name: name.to_string(),
            have_version,
            have_root,
            listen_addr: listen_addr.to_string(),
            have_chunks: self.salvage.have_chunks(shown),
            ..Default::default()
        }
    }

    /// A full or diff transfer in progress: (bytes held so far, including chunks reused from
    /// the local copy, and the file's length).
    pub fn backfill_progress(&self) -> Option<(u64, u64)> {
        match &self.upstream {
            Upstream::Snapshot(r) => Some(r.progress()),
            _ => None,
        }
    }

    /// Child side, during a transfer: its version, the chunks still missing (ascending) and
    /// the manifest, for fetching chunks from other sources.
    pub fn snapshot_wanted(&self) -> Option<(u64, Vec<u64>, Vec<Hash>)> {
        match &self.upstream {
            Upstream::Snapshot(r) => r.wanted(),
            _ => None,
        }
    }

    /// Child side: a chunk of the transfer at `version` fetched from another source, whose
    /// BLAKE3 the caller computed as `hash`. True when it was new; false when the transfer
    /// is no longer running or already held it. A hash that is not the manifest's is
    /// [`ReplicaError::BadChunk`] (the source is faulty; the transfer goes on).
    pub fn put_fetched_chunk(
        &mut self,
        version: u64,
        index: u64,
        data: Bytes,
        hash: Hash,
    ) -> Result<bool, ReplicaError> {
        match &mut self.upstream {
            Upstream::Snapshot(r) => {
                Ok(r.take_fetched(version, index, data, hash, &mut self.salvage)?)
            }
            _ => Ok(false),
        }
    }

    /// Child side: the parent's `SnapshotEnd` came but chunks fetched elsewhere are missing;
    /// the driver must not feed further frames until [`Replica::finish_snapshot`].
    pub fn snapshot_waiting(&self) -> bool {
        matches!(&self.upstream, Upstream::Snapshot(r) if r.waiting())
    }

    /// Child side: installs the transfer once its `SnapshotEnd` came and every chunk is in.
    pub fn finish_snapshot(&mut self) -> Result<Vec<Event>, ReplicaError> {
        let state = std::mem::replace(&mut self.upstream, Upstream::Idle);
        let r = match state {
            Upstream::Snapshot(r) if r.is_ended() => r,
            state => {
                self.upstream = state;
                return Err(ReplicaError::Unexpected {
                    frame: "finish",
                    state: "not at the end of a transfer",
                });
            }
        };
        let (file, commit_time_us, anchor) = r.finish()?;
        let version = file.version();
        let mut events = self.install(file);
        self.anchor = anchor.or(self.anchor.take());
        self.last_commit_time_us = commit_time_us;
        self.since_checkpoint = 0;
        events.push(Event::Applied {
            version,
            commit_time_us,
        });
        self.upstream = Upstream::Streaming;
        Ok(events)
    }

    /// A chunk with BLAKE3 `hash`, to serve another node's fetch: the file's chunk at
    /// `index` if it has that hash, or one verified during a transfer (at any index: the
    /// asker checks it against its manifest).
    pub fn find_chunk(&self, index: u64, hash: &Hash) -> Option<Bytes> {
        if self.file.chunk_hash(index).as_ref() == Some(hash) {
            return self.file.chunk(index);
        }
        self.salvage.find(hash)
    }

    /// Bytes of verified chunks kept from interrupted transfers.
    pub fn salvaged_bytes(&self) -> u64 {
        self.salvage.bytes()
    }

    /// Child side: the next frame fed in will be a new parent's `SubscribeOk` (after a
    /// [`Replica::subscription`] sent on a new stream, which named the version shown). An
    /// entry of the old stream not sealed yet is undone: carry out the returned events.
    pub fn expect_subscribe_ok(&mut self) -> Vec<Event> {
        let events = self.upstream_lost();
        self.upstream = Upstream::AwaitOk;
        events
    }

    /// Child side: the upstream stream ended; frames from it must no longer be fed in. An
    /// entry that was applied but never sealed is undone: carry out the returned events (the
    /// children that got it must resubscribe).
    pub fn upstream_lost(&mut self) -> Vec<Event> {
        self.upstream = Upstream::Idle;
        match self.unsealed.take() {
            Some(_) => vec![Event::RolledBack {
                version: self.file.version(),
            }],
            None => Vec::new(),
        }
    }

    /// Child side: one frame from the parent, `frame` being its encoded bytes as received.
    /// On error, drop the stream, call [`Replica::upstream_lost`] and resubscribe (with
    /// `full` when [`ReplicaError::needs_full_resync`]).
    pub fn handle_downstream(
        &mut self,
        frame: Bytes,
        msg: proto::Downstream,
    ) -> Result<Vec<Event>, ReplicaError> {
        self.handle_downstream_hashed(frame, msg, None)
    }

    /// [`Replica::handle_downstream`] for a driver that hashed a `SnapshotChunk`'s data
    /// already (`chunk_hash` must be [`crate::file::leaf_hash`] of exactly that data), so the
    /// hashing can run beside the replica rather than under its lock.
    pub fn handle_downstream_hashed(
        &mut self,
        frame: Bytes,
        msg: proto::Downstream,
        chunk_hash: Option<Hash>,
    ) -> Result<Vec<Event>, ReplicaError> {
        let r = self.handle_frame(frame, msg, chunk_hash);
        if r.as_ref().is_err_and(ReplicaError::needs_full_resync) {
            self.synced = false;
        }
        r
    }

    pub(super) fn handle_frame(
        &mut self,
        frame: Bytes,
        msg: proto::Downstream,
        chunk_hash: Option<Hash>,
    ) -> Result<Vec<Event>, ReplicaError> {
        let state = std::mem::replace(&mut self.upstream, Upstream::Idle);
        let unexpected = |state: &Upstream, kind: &Option<Down>| ReplicaError::Unexpected {
            frame: frame_name(kind),
            state: state.name(),
        };
        match (state, msg.kind) {
            (_, Some(Down::Refused(r))) => Err(ReplicaError::Refused(r.reason)),
            (Upstream::AwaitOk, Some(Down::SubscribeOk(ok))) => {
                self.upstream = if ok.resume {
                    Upstream::Streaming
                } else {
                    Upstream::AwaitSnapshot
                };
                Ok(vec![])
            }
            (Upstream::AwaitSnapshot, Some(Down::SnapshotBegin(b))) => {
                self.check_begin(&b)?;
                let r = Receiving::begin(b, self.cfg.max_len, &self.file, &mut self.salvage)?;
                self.upstream = Upstream::Snapshot(Box::new(r));
                Ok(vec![])
            }
            (Upstream::Snapshot(mut r), Some(Down::SnapshotChunk(c))) if !r.is_ended() => {
                r.take_pushed(c, chunk_hash, &mut self.salvage)?;
                self.upstream = Upstream::Snapshot(r);
                Ok(vec![])
            }
            (Upstream::Snapshot(mut r), Some(Down::SnapshotEnd(_))) if !r.is_ended() => {
                r.end();
                let waiting = r.waiting();
                self.upstream = Upstream::Snapshot(r);
                if waiting {
                    return Ok(vec![]);
                }
                self.finish_snapshot()
            }
            (Upstream::Streaming, Some(Down::Entry(e))) => {
                if let Some(u) = &self.unsealed {
                    return Err(unsealed_error(
                        "seal_missing",
                        format!("an entry came before the seal of version {}", u.version),
                    ));
                }
                let have = self.file.version();
                if e.prev_version != have || e.version <= have {
                    return Err(ReplicaError::Gap {
                        have,
                        prev: e.prev_version,
                    });
                }
                let update = Update::try_from(e.update.unwrap_or_default())?;
                self.file.validate(&update)?;
                self.commit_known = self.commit_known.max(e.version);
                self.upstream = Upstream::Streaming;
                if self.trust.verifier().is_none() {
                    self.file.apply(e.version, &update)?;
                    self.synced = true;
                    return Ok(self.after_apply(frame, Bytes::new(), e.commit_time_unix_us));
                }
                self.unsealed = Some(Unsealed {
                    version: e.version,
                    digest: entry_digest(&frame),
                    frame: frame.clone(),
                    commit_time_us: e.commit_time_unix_us,
                    update,
                });
                Ok(vec![Event::Broadcast(frame)])
            }
            (Upstream::Streaming, Some(Down::Seal(_))) if self.trust.verifier().is_none() => {
                self.upstream = Upstream::Streaming;
                Ok(vec![Event::Broadcast(frame)])
            }
            (Upstream::Streaming, Some(Down::Seal(seal))) => {
                let Some(u) = self.unsealed.take() else {
                    return Err(unsealed_error(
                        "seal_unexpected",
                        format!("a seal of version {} without its entry", seal.version),
                    ));
                };
                let anchor = Anchor::of_seal(&seal, Some(u.digest)).map_err(untrusted)?;
                let verified = self
                    .trust
                    .verifier()
                    .map(|v| v.verify(&anchor, &seal).map(|_| ()));
                if let Some(Err(e)) = verified {
                    self.unsealed = Some(u);
                    return Err(untrusted(e));
                }
                let undo = match self.file.apply_undoable(u.version, &u.update) {
                    Ok(undo) => undo,
                    Err(e) => {
                        self.unsealed = Some(u);
                        return Err(e.into());
                    }
                };
                let local = (self.file.version(), self.file.len(), self.file.root());
                if local != (anchor.version, anchor.length, anchor.root) {
                    self.file.undo(undo);
                    self.unsealed = Some(u);
                    return Err(ReplicaError::Diverged {
                        version: anchor.version,
                        expected: hex::encode(anchor.root),
                        got: hex::encode(local.2),
                    });
                }
                self.synced = true;
                self.anchor = Some((seal, Some(u.digest)));
                self.upstream = Upstream::Streaming;
                let mut events = self.after_apply(u.frame, frame, u.commit_time_us);
                // The entry went down when it came; only its seal goes now.
                events.remove(0);
                Ok(events)
            }
            (Upstream::Streaming, Some(Down::Checkpoint(c))) => {
                if let Some(u) = &self.unsealed {
                    return Err(unsealed_error(
                        "seal_missing",
                        format!("a checkpoint came before the seal of version {}", u.version),
                    ));
                }
                let have = self.file.version();
                if c.version != have {
                    return Err(ReplicaError::CheckpointOutOfStep {
                        checkpoint: c.version,
                        have,
                    });
                }
                if let Some((seal, _)) = &self.anchor {
                    if (seal.version, seal.length, &seal.root[..])
                        != (c.version, c.length, &c.root[..])
                    {
                        return Err(unsealed_error(
                            "checkpoint_contradicts",
                            format!(
                                "the checkpoint of version {} differs from the core's seal of it",
                                c.version
                            ),
                        ));
                    }
                }
                let local = self.file.root();
                if c.root.as_ref() != local.as_slice() || c.length != self.file.len() {
                    return Err(ReplicaError::Diverged {
                        version: c.version,
                        expected: hex::encode(&c.root),
                        got: hex::encode(local),
                    });
                }
                self.since_checkpoint = 0;
                self.upstream = Upstream::Streaming;
                Ok(vec![
                    Event::Broadcast(frame),
                    Event::CheckpointVerified { version: c.version },
                ])
            }
            (state, Some(Down::Heartbeat(h)))
                if !matches!(state, Upstream::Idle | Upstream::AwaitOk) =>
            {
                if !self.name.is_empty() && h.root_path.contains(&self.name) {
                    return Err(ReplicaError::Cycle(h.root_path));
                }
                if let Some(u) = &self.unsealed {
                    return Err(unsealed_error(
                        "seal_missing",
                        format!("a heartbeat came before the seal of version {}", u.version),
                    ));
                }
                self.commit_known = self.commit_known.max(h.commit_version);
                self.upstream = state;
                Ok(vec![])
            }
            (state, kind) => Err(unexpected(&state, &kind)),
        }
    }

    /// Child side: a transfer is accepted only under a core's seal of exactly the state it
    /// announces (version, length, chunk size, root, commit time).
    pub(super) fn check_begin(&self, b: &proto::SnapshotBegin) -> Result<(), ReplicaError> {
        let Some(verifier) = self.trust.verifier() else {
            return Ok(());
        };
        let Some(seal) = &b.anchor else {
            return Err(unsealed_error(
                "seal_missing",
                format!("a transfer of version {} without a core seal", b.version),
            ));
        };
        let entry = match b.anchor_entry.len() {
            0 => None,
            _ => Some(<Hash>::try_from(b.anchor_entry.as_ref()).map_err(|_| {
                unsealed_error("malformed", "anchor entry digest is not 32 bytes".into())
            })?),
        };
        let anchor = Anchor::of_seal(seal, entry).map_err(untrusted)?;
        let announced = (
            b.version,
            b.length,
            b.chunk_size,
            &b.root[..],
            b.commit_time_unix_us,
        );
        let sealed = (
            anchor.version,
            anchor.length,
            anchor.chunk_size,
            &anchor.root[..],
            anchor.commit_time_us,
        );
        if announced != sealed {
            return Err(unsealed_error(
                "anchor_mismatch",
                format!(
                    "the transfer announces version {} root {}, the core sealed version {} root {}",
                    b.version,
                    hex::encode(&b.root),
                    anchor.version,
                    hex::encode(anchor.root)
                ),
            ));
        }
        verifier.verify(&anchor, seal).map_err(untrusted)?;
        Ok(())
    }
}
