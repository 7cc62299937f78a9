//! Writing `--file` at the cost of the change: reflink clones, copies that take turns, or rewrites.
//!
//! Invariants:
//! - A reader that opens `--file` gets one whole version: every method writes into a file
//!   that is not `--file` at that moment, makes its data durable (`fdatasync`: the bytes
//!   and what it takes to read them back, not its times, so a copy patched in place costs
//!   no journal commit), renames a name of it over `--file` and fsyncs the directory.
//! - A physical file is patched only from a known image of it ([`Image`]): the version
//!   this materializer last wrote into it, or the copy the node read and hashed at start.
//!   A file whose content is not known (first write, an earlier failure, a chunk size that
//!   changed) is written whole; a failure while writing one forgets its image, and a swap
//!   copy that failed is emptied, so a full disk is not kept full by it.
//! - A patch writes only the 4 KiB pages that differ between the image and the new
//!   version, plus the change of length; pages past the old end that are all zero stay
//!   holes, as do all-zero chunks of a whole write. A page is compared by its bytes, or by
//!   its BLAKE3 chaining value where both versions of its chunk keep those (a chunk changed
//!   in place): the image then holds no bytes of that chunk, which the file can go on
//!   changing in place. A chunk the image knows by chaining values and the new version
//!   keeps none of (or has resized) is written whole.
//! - swap: two writes are at least `grace / (copies - 1)` apart, so under steady writes
//!   `--file` trails the newest version by at most that.
//! - swap: a copy is written only `grace` after it stopped being `--file`, and only under an
//!   exclusive `flock` taken without waiting: a reader holding a shared lock on the copy it
//!   opened defers the write, never sees it torn.
//! - Nothing here reads a clock: callers pass `now`.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::sync::Arc;

use bytes::Bytes;

use crate::config::{MaterializeConfig, MaterializeMode, MAX_MATERIALIZE_COPIES};
use crate::file::{ChunkedFile, Hash};
use crate::merkle::{chunk_len_for, PieceCv};

/// Granularity of a patch: the page size of the kernels Canopy runs on.
pub const PAGE: usize = 4096;

const _: () = assert!(
    crate::merkle::PIECE == PAGE,
    "a piece's chaining value stands for a page"
);

/// How long a write waits before trying again when a reader holds a lock on its target.
pub const RETRY_LOCKED: Duration = Duration::from_millis(100);

/// `FICLONE` from `linux/fs.h`: `_IOW(0x94, 9, int)`.
const FICLONE: libc::c_ulong = 0x4004_9409;

/// Why `--file` cannot be materialized the way the configuration asks.
#[derive(Debug, thiserror::Error)]
pub enum MaterializeError {
    #[error("materialize.mode = \"{mode}\" but {dir} cannot do it: {source}")]
    Unsupported {
        mode: &'static str,
        dir: PathBuf,
        source: io::Error,
    },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// The way this node writes `--file`, decided once at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Reflink,
    Swap,
    Rewrite,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reflink => "reflink",
            Self::Swap => "swap",
            Self::Rewrite => "rewrite",
        }
    }
}

/// What [`Materializer::write`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `--file` now holds the version given; `bytes` were written to disk for it (content
    /// only: the filesystem adds its metadata), `whole` when it was not a patch.
    Written { bytes: u64, whole: bool },
    /// Nothing was written: call again with the newest version after this long (a swap
    /// copy still in its grace period, or locked by a reader).
    Wait(Duration),
}

/// What a physical file is known to hold, to patch it from: its length and chunk size,
/// and per chunk its hash and what its pages are compared by.
#[derive(Clone)]
pub struct Image {
    len: u64,
    chunk_size: u32,
    chunks: Vec<(Hash, Pages)>,
}

/// How an [`Image`] knows a chunk's pages.
#[derive(Clone)]
enum Pages {
    /// By the chaining value of each 4 KiB piece: the file keeps them for a chunk a write
    /// changed in place, and holding them leaves the chunk's bytes to the file alone.
    Pieces(Arc<[PieceCv]>),
    /// By the bytes: a chunk the file keeps no pieces of (shared with the file until it
    /// changes, so the next write into it copies it).
    Bytes(Bytes),
}

impl Image {
    /// The image of `file`: for each chunk, its pieces where the file keeps them, else its
    /// bytes (shared, not copied).
    pub fn of(file: &ChunkedFile) -> Self {
        let chunks = (0..file.chunk_count())
            .map(|i| {
                let hash = file.chunk_hash(i).unwrap_or_default();
                let pages = match file.chunk_pieces(i) {
                    Some(p) => Pages::Pieces(p),
                    None => Pages::Bytes(file.chunk(i).unwrap_or_default()),
                };
                (hash, pages)
            })
            .collect();
        Self {
            len: file.len(),
            chunk_size: file.chunk_size(),
            chunks,
        }
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }
}

/// One physical copy of the swap method.
struct Copy {
    path: PathBuf,
    /// What it holds, when known.
    image: Option<Image>,
    /// When it stopped being `--file` (`None`: not since start).
    retired: Option<Instant>,
}

/// Writes the versions of one `--file`; blocking IO, to be run off the async workers.
pub struct Materializer {
    path: PathBuf,
    dir: PathBuf,
    method: Method,
    grace: Duration,
    /// swap: the least time between two writes, `grace / (copies - 1)`: under steady
    /// writes the copy retired longest ago leaves its grace just as this has passed, so
    /// `--file` is replaced at an even pace and trails the newest version by at most this,
    /// where writing each copy as soon as its grace ended gave pairs of writes and then a
    /// wait of nearly `grace`.
    spacing: Duration,
    /// swap: when the last write made a copy `--file`.
    last_swap: Option<Instant>,
    /// reflink: what `--file` holds, when known.
    image: Option<Image>,
    /// swap: the copies, and which one `--file` is.
    copies: Vec<Copy>,
    current: Option<usize>,
}

impl Materializer {
    /// Decides the method for `path` (trying reflink, then hard links, in its directory)
    /// and takes `loaded`, the content the node read from `path` at start, as the image of
    /// the file `path` names. Fails only where `cfg.mode` forces a method the filesystem
    /// cannot do, or the directory cannot be written.
    pub fn open(
        path: &Path,
        cfg: &MaterializeConfig,
        loaded: Option<ChunkedFile>,
    ) -> Result<Self, MaterializeError> {
        let loaded = loaded.as_ref().map(Image::of);
        let dir = parent_dir(path);
        std::fs::create_dir_all(&dir).map_err(|source| MaterializeError::Io {
            path: dir.clone(),
            source,
        })?;
        let unsupported = |mode: MaterializeMode, source| MaterializeError::Unsupported {
            mode: mode.as_str(),
            dir: dir.clone(),
            source,
        };
        let method = match cfg.mode {
            MaterializeMode::Reflink => {
                probe(&dir, Probe::Reflink).map_err(|e| unsupported(cfg.mode, e))?;
                Method::Reflink
            }
            MaterializeMode::Swap => {
                probe(&dir, Probe::Link).map_err(|e| unsupported(cfg.mode, e))?;
                Method::Swap
            }
            MaterializeMode::Rewrite => Method::Rewrite,
            MaterializeMode::Auto => {
                if probe(&dir, Probe::Reflink).is_ok() {
                    Method::Reflink
                } else if probe(&dir, Probe::Link).is_ok() {
                    Method::Swap
                } else {
                    Method::Rewrite
                }
            }
        };
        let name = file_name(path);
        let copy_path = |i: u32| dir.join(format!(".{name}.canopy-{i}"));
        let on_path = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
        let same_inode = |p: &Path| {
            std::fs::metadata(p)
                .ok()
                .is_some_and(|m| Some((m.dev(), m.ino())) == on_path)
        };
        let mut m = Self {
            path: path.to_path_buf(),
            dir: dir.clone(),
            method,
            grace: Duration::from_millis(cfg.grace_ms),
            spacing: Duration::from_millis(cfg.grace_ms) / cfg.copies.saturating_sub(1).max(1),
            last_swap: None,
            image: None,
            copies: Vec::new(),
            current: None,
        };
        let wanted = if method == Method::Swap {
            cfg.copies
        } else {
            0
        };
        for i in 0..MAX_MATERIALIZE_COPIES {
            let p = copy_path(i);
            if i < wanted {
                let current = same_inode(&p);
                if current {
                    m.current = Some(i as usize);
                }
                m.copies.push(Copy {
                    path: p,
                    image: if current { loaded.clone() } else { None },
                    retired: None,
                });
            } else if p.exists() {
                let _ = std::fs::remove_file(&p);
            }
        }
        if method == Method::Reflink {
            m.image = loaded;
        }
        Ok(m)
    }

    pub fn method(&self) -> Method {
        self.method
    }

    /// Makes `--file` hold `file`, or says how long to wait before asking again. Call it
    /// with the newest version each time; an error leaves `--file` at its last version.
    pub fn write(&mut self, now: Instant, file: &ChunkedFile) -> io::Result<Outcome> {
        match self.method {
            Method::Swap => self.write_swap(now, file),
            Method::Reflink => {
                let tmp = self.aside("canopy-tmp");
                let image = self.image.clone();
                let (bytes, whole) = self.replace_via(&tmp, |tmp| {
                    let f = create(tmp)?;
                    let cloned = match &image {
                        Some(img) if img.chunk_size() == file.chunk_size() => {
                            File::open(&self.path).and_then(|src| ficlone(&f, &src))
                        }
                        _ => Err(io::Error::other("no image")),
                    };
                    let written = match (cloned, &image) {
                        (Ok(()), Some(img)) => (patch(&f, img, file)?, false),
                        _ => (write_whole(&f, file)?, true),
                    };
                    f.sync_data()?;
                    Ok(written)
                })?;
                self.image = Some(Image::of(file));
                Ok(Outcome::Written { bytes, whole })
            }
            Method::Rewrite => {
                let tmp = self.aside("canopy-tmp");
                let (bytes, _) = self.replace_via(&tmp, |tmp| {
                    let f = create(tmp)?;
                    let n = write_whole(&f, file)?;
                    f.sync_data()?;
                    Ok((n, true))
                })?;
                Ok(Outcome::Written { bytes, whole: true })
            }
        }
    }

    /// How long [`Materializer::write`] would answer [`Outcome::Wait`] at `now` without
    /// touching the disk: in swap mode, until the copy it would patch next is out of its
    /// grace and the spacing since the last write has passed (`None`: it would write now).
    /// A driver that asks first spares a trip to the writer thread for nothing.
    pub fn wait_for(&self, now: Instant) -> Option<Duration> {
        if self.method != Method::Swap {
            return None;
        }
        let target = self.swap_target()?;
        let graced = self.copies[target].retired.map(|r| r + self.grace);
        let spaced = self.last_swap.map(|w| w + self.spacing);
        let ready = graced.max(spaced)?;
        (now < ready).then(|| ready - now)
    }

    /// The copy a swap write patches next: the one retired longest ago (never used first).
    fn swap_target(&self) -> Option<usize> {
        (0..self.copies.len())
            .filter(|i| Some(*i) != self.current)
            .min_by_key(|i| self.copies[*i].retired)
    }

    fn write_swap(&mut self, now: Instant, file: &ChunkedFile) -> io::Result<Outcome> {
        if let Some(d) = self.wait_for(now) {
            return Ok(Outcome::Wait(d));
        }
        let target = self.swap_target().expect("at least two copies");
        let c = &mut self.copies[target];
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&c.path)?;
        if !try_lock_exclusive(&f)? {
            return Ok(Outcome::Wait(RETRY_LOCKED));
        }
        let image = c.image.take();
        let target_path = c.path.clone();
        let link = self.aside("canopy-link");
        let done = (|| {
            let w = match &image {
                Some(img) if img.chunk_size() == file.chunk_size() => {
                    (patch(&f, img, file)?, false)
                }
                _ => (write_whole(&f, file)?, true),
            };
            f.sync_data()?;
            remove_if_present(&link)?;
            std::fs::hard_link(&target_path, &link)?;
            if let Err(e) = std::fs::rename(&link, &self.path) {
                let _ = std::fs::remove_file(&link);
                return Err(e);
            }
            Ok(w)
        })();
        let (bytes, whole) = match done {
            Ok(w) => w,
            Err(e) => {
                let _ = f.set_len(0);
                return Err(e);
            }
        };
        if let Some(old) = self.current {
            self.copies[old].retired = Some(now);
        }
        self.current = Some(target);
        self.last_swap = Some(now);
        self.copies[target].image = Some(Image::of(file));
        self.copies[target].retired = None;
        drop(f);
        sync_dir(&self.dir)?;
        Ok(Outcome::Written { bytes, whole })
    }

    /// Writes through `fill` into `tmp`, renames it over `--file` and fsyncs the directory;
    /// `tmp` is removed on any failure.
    fn replace_via(
        &self,
        tmp: &Path,
        fill: impl FnOnce(&Path) -> io::Result<(u64, bool)>,
    ) -> io::Result<(u64, bool)> {
        let written = fill(tmp).and_then(|w| std::fs::rename(tmp, &self.path).map(|()| w));
        match written {
            Ok(w) => {
                sync_dir(&self.dir)?;
                Ok(w)
            }
            Err(e) => {
                let _ = std::fs::remove_file(tmp);
                Err(e)
            }
        }
    }

    /// A name beside `--file` for this materializer's own use.
    fn aside(&self, what: &str) -> PathBuf {
        self.dir.join(format!(".{}.{what}", file_name(&self.path)))
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn create(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

enum Probe {
    Reflink,
    Link,
}

/// Tries one method on two scratch files in `dir`, and removes them.
fn probe(dir: &Path, what: Probe) -> io::Result<()> {
    let a = dir.join(format!(".canopy-probe-{}-a", std::process::id()));
    let b = dir.join(format!(".canopy-probe-{}-b", std::process::id()));
    let tried = (|| {
        let fa = create(&a)?;
        fa.write_all_at(&[1u8; PAGE], 0)?;
        match what {
            Probe::Reflink => ficlone(&create(&b)?, &fa),
            Probe::Link => {
                remove_if_present(&b)?;
                std::fs::hard_link(&a, &b)
            }
        }
    })();
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    tried
}

/// Makes `dst` share all of `src`'s extents (`ioctl(FICLONE)`).
fn ficlone(dst: &File, src: &File) -> io::Result<()> {
    // SAFETY: both descriptors are open for the duration of the call; FICLONE reads one int.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `flock(LOCK_EX | LOCK_NB)`: `Ok(false)` when a reader holds a lock on the file. (std's
/// `File::try_lock` is newer than this crate's minimum Rust.)
fn try_lock_exclusive(f: &File) -> io::Result<bool> {
    // SAFETY: the descriptor is open; flock takes no pointers.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock {
        Ok(false)
    } else {
        Err(e)
    }
}

fn write_at(f: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    f.write_all_at(buf, offset)?;
    super::failpoint::materialize_wrote(buf.len());
    Ok(())
}

/// Makes `f` hold `file`, written from its start: all-zero chunks become holes. Returns
/// the bytes written.
pub fn write_whole(f: &File, file: &ChunkedFile) -> io::Result<u64> {
    f.set_len(0)?;
    let cs = u64::from(file.chunk_size());
    let zero_leaf = crate::file::leaf_hash(&vec![0u8; cs as usize]);
    let mut written = 0u64;
    for i in 0..file.chunk_count() {
        let chunk = file.chunk(i).unwrap_or_default();
        let zero = if chunk.len() as u64 == cs {
            file.chunk_hash(i) == Some(zero_leaf)
        } else {
            chunk.iter().all(|b| *b == 0)
        };
        if !zero {
            write_at(f, &chunk, i * cs)?;
            written += chunk.len() as u64;
        }
    }
    f.set_len(file.len())?;
    Ok(written)
}

/// Turns `f`, which holds `old`, into `new` by writing the pages that differ. Returns the
/// bytes written.
pub fn patch(f: &File, old: &Image, new: &ChunkedFile) -> io::Result<u64> {
    let cs = u64::from(new.chunk_size());
    if new.len() < old.len {
        f.set_len(new.len())?;
    }
    let mut written = 0u64;
    for i in 0..new.chunk_count() {
        let n = new.chunk(i).unwrap_or_default();
        written += match old.chunks.get(i as usize) {
            None => write_changed_pages(f, i * cs, &n, &[])?,
            Some((hash, _)) if Some(*hash) == new.chunk_hash(i) => 0,
            Some((_, Pages::Bytes(o))) => write_changed_pages(f, i * cs, &n, o)?,
            Some((_, Pages::Pieces(o))) => match new.chunk_pieces(i) {
                Some(p)
                    if p.len() == o.len()
                        && chunk_len_for(old.len, old.chunk_size, i) == n.len() as u64 =>
                {
                    write_pages_where(f, i * cs, &n, |k| p[k] != o[k])?
                }
                _ => write_pages_where(f, i * cs, &n, |_| true)?,
            },
        };
    }
    if new.len() != old.len {
        f.set_len(new.len())?;
    }
    Ok(written)
}

/// Writes the runs of pages of `new` that differ from `old` (zeros past `old`'s end), at
/// `offset`.
fn write_changed_pages(f: &File, offset: u64, new: &[u8], old: &[u8]) -> io::Result<u64> {
    write_pages_where(f, offset, new, |p| {
        let end = ((p + 1) * PAGE).min(new.len());
        let n = &new[p * PAGE..end];
        let o_end = end.min(old.len());
        let o = old.get(p * PAGE..o_end).unwrap_or(&[]);
        n[..o.len()] != *o || n[o.len()..].iter().any(|b| *b != 0)
    })
}

/// Writes the runs of pages `p` of `new` for which `differs(p)`, at `offset`.
fn write_pages_where(
    f: &File,
    offset: u64,
    new: &[u8],
    differs: impl Fn(usize) -> bool,
) -> io::Result<u64> {
    let pages = new.len().div_ceil(PAGE);
    let mut written = 0u64;
    let mut p = 0;
    while p < pages {
        if !differs(p) {
            p += 1;
            continue;
        }
        let start = p;
        while p < pages && differs(p) {
            p += 1;
        }
        let run = &new[start * PAGE..(p * PAGE).min(new.len())];
        write_at(f, run, offset + (start * PAGE) as u64)?;
        written += run.len() as u64;
    }
    Ok(written)
}

#[cfg(test)]
#[path = "materialize_tests.rs"]
mod tests;
