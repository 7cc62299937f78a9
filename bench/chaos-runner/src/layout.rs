//! Where the writes of a chaos run go in the file, and what each one writes.
//!
//! Invariants:
//! - Writer w owns a region of its own; its write i covers slots i and i+1 of that region
//!   with its record, then its marker. So every write is unique and recognizable, and a
//!   write applied again after the writer's next write was applied leaves its marker over
//!   the next write's record, which the checker sees.
//! - Records and markers are printable and never all zeros, so an untouched slot (zeros)
//!   is told apart from every write.

/// Bytes of one slot.
pub const SLOT: usize = 32;

/// How the file is divided between the writers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The file's length.
    pub file_len: u64,
    /// Number of writers.
    pub writers: u32,
}

/// What a slot holds in a final copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotContent {
    /// Zeros: no write reached it.
    Empty,
    /// The record of the write this slot belongs to.
    Record,
    /// The marker of the writer's previous write.
    PreviousMarker,
    /// Anything else (printed for the report).
    Other(String),
}

impl Layout {
    /// Slots in one writer's region.
    pub fn slots_per_writer(&self) -> u64 {
        self.file_len / self.writers.max(1) as u64 / SLOT as u64
    }

    /// Writes one writer can make (the last slot only ever holds a marker).
    pub fn writes_per_writer(&self) -> u64 {
        self.slots_per_writer().saturating_sub(1)
    }

    /// Offset of slot `i` of writer `w`.
    pub fn offset(&self, w: u32, i: u64) -> u64 {
        (w as u64 * self.slots_per_writer() + i) * SLOT as u64
    }

    /// The bytes write `i` of writer `w` sends: its record, then its marker.
    pub fn payload(&self, w: u32, i: u64) -> Vec<u8> {
        let mut p = record(w, i).to_vec();
        p.extend_from_slice(&marker(w, i));
        p
    }

    /// What slot `i` of writer `w` holds in `file`.
    pub fn slot(&self, file: &[u8], w: u32, i: u64) -> SlotContent {
        let at = self.offset(w, i) as usize;
        let Some(s) = file.get(at..at + SLOT) else {
            return SlotContent::Other(format!("beyond the end ({} bytes)", file.len()));
        };
        if s.iter().all(|b| *b == 0) {
            SlotContent::Empty
        } else if s == record(w, i) {
            SlotContent::Record
        } else if i > 0 && s == marker(w, i - 1) {
            SlotContent::PreviousMarker
        } else {
            SlotContent::Other(String::from_utf8_lossy(s).trim_end().to_string())
        }
    }
}

fn padded(text: String) -> [u8; SLOT] {
    let mut s = [b'.'; SLOT];
    s[SLOT - 1] = b'\n';
    let n = text.len().min(SLOT - 1);
    s[..n].copy_from_slice(&text.as_bytes()[..n]);
    s
}

/// The record of write `i` of writer `w`.
pub fn record(w: u32, i: u64) -> [u8; SLOT] {
    padded(format!("rec w{w:02} i{i:06} "))
}

/// The marker write `i` of writer `w` leaves in the slot after its record.
pub fn marker(w: u32, i: u64) -> [u8; SLOT] {
    padded(format!("mark w{w:02} after i{i:06} "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_laid_out_per_writer_and_recognized() {
        let l = Layout {
            file_len: 4096,
            writers: 2,
        };
        assert_eq!((l.slots_per_writer(), l.writes_per_writer()), (64, 63));
        assert_eq!(l.offset(1, 0), 2048);
        let mut file = vec![0u8; 4096];
        let at = l.offset(1, 5) as usize;
        file[at..at + 2 * SLOT].copy_from_slice(&l.payload(1, 5));
        assert_eq!(l.slot(&file, 1, 5), SlotContent::Record);
        assert_eq!(l.slot(&file, 1, 6), SlotContent::PreviousMarker);
        assert_eq!(l.slot(&file, 1, 7), SlotContent::Empty);
        assert_eq!(
            l.slot(&file, 0, 5),
            SlotContent::Empty,
            "writer 0's region is untouched"
        );
        file[at] = b'X';
        assert!(matches!(l.slot(&file, 1, 5), SlotContent::Other(s) if s.starts_with("Xec w01")));
        assert!(matches!(l.slot(&file[..100], 1, 5), SlotContent::Other(_)));
        assert_eq!(&record(3, 42)[..16], b"rec w03 i000042 ");
    }
}
