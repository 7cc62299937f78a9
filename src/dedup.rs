//! The proposal-id deduplication table: how each recently applied proposal id turned out.
//!
//! Invariants:
//! - It is part of the replicated state: every core member records the same ids in the same
//!   (log) order, so every member holds the same table after the same entries, and a snapshot
//!   carries it so that a member restored from one deduplicates exactly like the others.
//! - It holds at most [`DEDUP_WINDOW`] ids; recording one more forgets the oldest. That is the
//!   horizon: a retry is answered from the table (and not applied again) while fewer than
//!   `DEDUP_WINDOW` proposals were applied after its first copy.
//! - Ids are at most [`MAX_PROPOSAL_ID`] bytes and `Rejected` reasons at most
//!   [`MAX_REASON`] bytes (cut at a character boundary when recorded), so the table and its
//!   encoding are bounded: at most `DEDUP_WINDOW * (MAX_PROPOSAL_ID + MAX_REASON + 16)` bytes.
//! - Decoding checks every count and length against these bounds before allocating.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};

use bytes::Bytes;

use crate::file::ApplyOutcome;

/// Proposal ids remembered. 100 000: a node retries a proposal for at most its leader wait
/// (10 s), so the window covers retries at up to 10 000 proposals per second; a snapshot then
/// carries about 3 MB of table.
pub const DEDUP_WINDOW: usize = 100_000;

/// Longest proposal id accepted (nodes pick 16 random bytes).
pub const MAX_PROPOSAL_ID: usize = 64;

/// Longest `Rejected` reason kept in the table.
pub const MAX_REASON: usize = 512;

/// Ids applied most recently with their outcomes, oldest first; see the module docs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DedupTable {
    outcomes: HashMap<Bytes, ApplyOutcome>,
    order: VecDeque<Bytes>,
}

/// A table section that cannot be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DedupError {
    #[error("dedup table: {0}")]
    Io(#[from] io::Error),
    #[error("dedup table: {0}")]
    Malformed(String),
}

impl DedupTable {
    /// How the proposal with this id applied, if it is within the window.
    pub fn get(&self, id: &[u8]) -> Option<&ApplyOutcome> {
        self.outcomes.get(id)
    }

    /// Remember how the proposal `id` applied (no-op for an empty id, one longer than
    /// [`MAX_PROPOSAL_ID`] or one already present), forgetting the oldest id beyond the window.
    pub fn record(&mut self, id: Bytes, outcome: ApplyOutcome) {
        if id.is_empty() || id.len() > MAX_PROPOSAL_ID || self.outcomes.contains_key(&id) {
            return;
        }
        let outcome = match outcome {
            ApplyOutcome::Rejected { version, reason } => ApplyOutcome::Rejected {
                version,
                reason: truncate(reason),
            },
            other => other,
        };
        self.outcomes.insert(id.clone(), outcome);
        self.order.push_back(id);
        while self.order.len() > DEDUP_WINDOW {
            if let Some(old) = self.order.pop_front() {
                self.outcomes.remove(&old);
            }
        }
    }

    /// Number of ids held.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Ids with their outcomes, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = (&Bytes, &ApplyOutcome)> {
        self.order
            .iter()
            .filter_map(|id| self.outcomes.get(id).map(|o| (id, o)))
    }

    /// Encoding: u32 LE count, then per id (oldest first): u8 id length, the id, u8 kind
    /// (0 applied, 1 precondition failed, 2 rejected), u64 LE version, and for rejected a u16
    /// LE reason length and the reason (UTF-8).
    pub fn encode_to<W: Write>(&self, w: &mut W) -> io::Result<()> {
        w.write_all(&(self.len() as u32).to_le_bytes())?;
        for (id, outcome) in self.iter() {
            w.write_all(&[id.len() as u8])?;
            w.write_all(id)?;
            let (kind, version, reason) = match outcome {
                ApplyOutcome::Applied { version } => (0u8, *version, None),
                ApplyOutcome::PreconditionFailed { version } => (1, *version, None),
                ApplyOutcome::Rejected { version, reason } => (2, *version, Some(reason)),
            };
            w.write_all(&[kind])?;
            w.write_all(&version.to_le_bytes())?;
            if let Some(reason) = reason {
                w.write_all(&(reason.len() as u16).to_le_bytes())?;
                w.write_all(reason.as_bytes())?;
            }
        }
        Ok(())
    }

    /// Decode what [`DedupTable::encode_to`] wrote, checking every bound first.
    pub fn decode_from<R: Read>(r: &mut R) -> Result<DedupTable, DedupError> {
        let count = u32::from_le_bytes(read_array(r)?) as usize;
        if count > DEDUP_WINDOW {
            return Err(DedupError::Malformed(format!(
                "{count} ids, more than the window of {DEDUP_WINDOW}"
            )));
        }
        let mut table = DedupTable::default();
        for _ in 0..count {
            let [id_len] = read_array::<1, _>(r)?;
            let id_len = id_len as usize;
            if id_len == 0 || id_len > MAX_PROPOSAL_ID {
                return Err(DedupError::Malformed(format!("id of {id_len} bytes")));
            }
            let mut id = vec![0u8; id_len];
            r.read_exact(&mut id)?;
            let [kind] = read_array::<1, _>(r)?;
            let version = u64::from_le_bytes(read_array(r)?);
            let outcome = match kind {
                0 => ApplyOutcome::Applied { version },
                1 => ApplyOutcome::PreconditionFailed { version },
                2 => {
                    let len = u16::from_le_bytes(read_array(r)?) as usize;
                    if len > MAX_REASON {
                        return Err(DedupError::Malformed(format!("reason of {len} bytes")));
                    }
                    let mut reason = vec![0u8; len];
                    r.read_exact(&mut reason)?;
                    let reason = String::from_utf8(reason)
                        .map_err(|_| DedupError::Malformed("reason is not UTF-8".into()))?;
                    ApplyOutcome::Rejected { version, reason }
                }
                k => return Err(DedupError::Malformed(format!("outcome kind {k}"))),
            };
            let id = Bytes::from(id);
            if table.outcomes.contains_key(&id) {
                return Err(DedupError::Malformed("an id appears twice".into()));
            }
            table.record(id, outcome);
        }
        Ok(table)
    }
}

fn truncate(mut reason: String) -> String {
    if reason.len() > MAX_REASON {
        let mut cut = MAX_REASON;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    reason
}

fn read_array<const N: usize, R: Read>(r: &mut R) -> io::Result<[u8; N]> {
    let mut buf = [0u8; N];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: u64) -> Bytes {
        Bytes::copy_from_slice(&i.to_le_bytes())
    }

    #[test]
    fn keeps_the_newest_window_in_order() {
        let mut t = DedupTable::default();
        for i in 0..(DEDUP_WINDOW as u64 + 10) {
            t.record(id(i), ApplyOutcome::Applied { version: i });
        }
        assert_eq!(t.len(), DEDUP_WINDOW);
        assert!(t.get(&id(9)).is_none());
        assert_eq!(t.get(&id(10)), Some(&ApplyOutcome::Applied { version: 10 }));
        assert_eq!(t.iter().next().unwrap().0, &id(10));
        t.record(id(10), ApplyOutcome::PreconditionFailed { version: 0 });
        assert_eq!(
            t.get(&id(10)),
            Some(&ApplyOutcome::Applied { version: 10 }),
            "the first outcome stays"
        );
        t.record(Bytes::new(), ApplyOutcome::Applied { version: 1 });
        assert_eq!(t.len(), DEDUP_WINDOW);
    }

    #[test]
    fn encoding_round_trips_and_bounds_reasons() {
        let mut t = DedupTable::default();
        t.record(id(1), ApplyOutcome::Applied { version: 4 });
        t.record(id(2), ApplyOutcome::PreconditionFailed { version: 4 });
        t.record(
            Bytes::from(vec![7u8; MAX_PROPOSAL_ID]),
            ApplyOutcome::Rejected {
                version: 5,
                reason: "é".repeat(MAX_REASON),
            },
        );
        let ApplyOutcome::Rejected { reason, .. } = t.iter().last().unwrap().1 else {
            panic!("rejected");
        };
        assert!(reason.len() <= MAX_REASON && reason.len() > MAX_REASON - 2);
        let mut buf = Vec::new();
        t.encode_to(&mut buf).unwrap();
        let back = DedupTable::decode_from(&mut buf.as_slice()).unwrap();
        assert_eq!(back, t);
        assert_eq!(
            back.iter().map(|(i, _)| i.clone()).collect::<Vec<_>>(),
            t.iter().map(|(i, _)| i.clone()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn hostile_encodings_are_refused_before_allocating() {
        let huge = u32::MAX.to_le_bytes();
        assert!(matches!(
            DedupTable::decode_from(&mut huge.as_slice()),
            Err(DedupError::Malformed(_))
        ));
        let mut long_id = 1u32.to_le_bytes().to_vec();
        long_id.push(200);
        assert!(matches!(
            DedupTable::decode_from(&mut long_id.as_slice()),
            Err(DedupError::Malformed(_))
        ));
        let mut long_reason = 1u32.to_le_bytes().to_vec();
        long_reason.extend_from_slice(&[1, 9, 2]);
        long_reason.extend_from_slice(&0u64.to_le_bytes());
        long_reason.extend_from_slice(&u16::MAX.to_le_bytes());
        assert!(matches!(
            DedupTable::decode_from(&mut long_reason.as_slice()),
            Err(DedupError::Malformed(_))
        ));
        let truncated = 3u32.to_le_bytes();
        assert!(matches!(
            DedupTable::decode_from(&mut truncated.as_slice()),
            Err(DedupError::Io(_))
        ));
    }
}
