//! A core node's glue to its Raft group: the state machine openraft applies to (the
//! replica), forming or joining the group at start, and the checkpoint ticker.
//!
//! Invariants:
//! - Committed entries reach the replica in log order, under the state lock, and what the
//!   replica returns (the frames for the children) is dispatched in the same critical
//!   section, so every child sees the core's order.
//! - A checkpoint goes down the stream at least every `checkpoint_interval_ms`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::NodeKind;
use crate::consensus::{Core, FileStateMachine, Member};
use crate::file::{ApplyOutcome, ChunkedFile};
use crate::proto;
use crate::replica::Event;

use super::downstream::dispatch;
use super::error::NodeError;
use super::propose::batcher;
use super::shared::{now_us, Shared};

/// The replica as openraft's state machine.
struct CoreSm(Arc<Shared>);

impl FileStateMachine for CoreSm {
    fn apply(&self, log_index: u64, proposal: &proto::Proposal) -> ApplyOutcome {
        let mut st = self.0.state.lock();
        let (outcome, events) = st.replica.apply_committed(log_index, proposal, now_us());
        dispatch(&self.0, &mut st, events);
        outcome
    }

    fn current(&self) -> ChunkedFile {
        self.0.state.lock().replica.file().clone()
    }

    fn install(&self, file: ChunkedFile) {
        let mut st = self.0.state.lock();
        let version = file.version();
        let mut events = st.replica.install(file);
        events.push(Event::Applied {
            version,
            commit_time_us: now_us(),
        });
        dispatch(&self.0, &mut st, events);
    }
}

/// Opens the Raft group of a core node (forming it with `--init`), and starts the batcher
/// and the checkpoint ticker. Does nothing on a relay.
pub(crate) async fn start(shared: &Arc<Shared>) -> Result<(), NodeError> {
    let NodeKind::Core { raft, init, peers } = &shared.cfg.kind else {
        return Ok(());
    };
    let me = Member {
        name: shared.cfg.name.clone(),
        addr: shared.cfg.advertise.to_string(),
    };
    let core = Core::open(
        me.clone(),
        &shared.cfg.data,
        Arc::new(CoreSm(shared.clone())),
        raft,
        shared.endpoint.clone(),
        shared.cfg.stream.max_frame,
    )
    .await?;
    let core = Arc::new(core);
    let _ = shared.core.set(core.clone());
    if *init {
        let members: BTreeMap<_, _> = if peers.is_empty() {
            BTreeMap::from([(me.id(), me)])
        } else {
            peers.iter().map(|m| (m.id(), m.clone())).collect()
        };
        core.initialize(members).await?;
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let _ = shared.batcher.set(tx);
    shared.tasks.spawn(batcher(shared.clone(), core, rx));
    shared.tasks.spawn(ticker(shared.clone()));
    Ok(())
}

/// Sends a checkpoint down the stream every `checkpoint_interval_ms` (the replica also sends
/// one every `checkpoint_every` entries).
async fn ticker(shared: Arc<Shared>) {
    let cp = Duration::from_millis(shared.cfg.stream.checkpoint_interval_ms);
    let mut cp_tick = tokio::time::interval(cp);
    cp_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = cp_tick.tick() => {}
        }
        let mut st = shared.state.lock();
        let events = st.replica.checkpoint().into_iter().collect();
        dispatch(&shared, &mut st, events);
    }
}
