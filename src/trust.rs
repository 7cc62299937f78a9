//! Only the core is trusted for content: signed anchors over what it commits, and their
//! verification by every other node.
//!
//! An anchor binds the cluster, a version, the file's length, chunk size and root at that
//! version, the core's commit time, and, for the anchor that seals an entry, the BLAKE3 of
//! that entry's frame. A core node signs one anchor per entry it produces (an entry is one
//! commit batch: the group commit puts every proposal of a batch in one entry), with the key
//! of its own certificate.
//!
//! Invariants:
//! - A signature verifies only with the key of a certificate that chains to a CA of the
//!   cluster, is within its validity period when learnt, and has the core role
//!   ([`Verifier::learn`]); the cluster id in the signed message is BLAKE3 of the CA that
//!   issued the signer's certificate (so a CA rotation, with both CAs trusted, keeps working).
//! - The signed message is domain-separated and names the cluster and the purpose (sealing an
//!   entry, or anchoring a state), so a signature made for one never verifies for another.
//! - At most [`MAX_SIGNERS`] signer certificates are kept; learning one more forgets the one
//!   that expires first.
//! - Nothing here reads a clock: callers pass the time at which certificates are checked.
//! - A signature check that succeeded is remembered, process-wide, by the BLAKE3 of the exact
//!   (algorithm, public key, message, signature) it checked, for the last
//!   [`VERIFIED_MEMO`] checks: the result is a pure function of those bytes, so a hit is the
//!   same answer without the curve arithmetic. Several nodes in one process (`canopy demo`,
//!   tests) then check each seal once; a deployment, one node per process, gains nothing
//!   and loses nothing. Failures are never remembered.
//! - Seal chains: an entry seal signs the link of the entry seal its sealer made before it
//!   ([`Anchor::prev`]). [`Verifier::check_chain`] remembers a seal as checked without its
//!   own curve arithmetic only when every link from it to the last seal of its run holds
//!   (the link covers message and signature) and that last seal's signature verifies.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use rustls::SignatureScheme;

use crate::file::Hash;
use crate::proto;
use crate::tls::{Identity, Role};

/// Most signer certificates a node keeps (a core has at most 5 members; rotations add some).
pub const MAX_SIGNERS: usize = 16;

/// Largest signer certificate accepted, in bytes (ours are about 600).
pub const MAX_CERT_BYTES: usize = 16 * 1024;

const DOMAIN: &[u8] = b"canopy-anchor-v1\0";

/// How many successful signature checks are remembered (a few seconds of seals at a high
/// write rate; 40 bytes each).
pub const VERIFIED_MEMO: usize = 4096;

/// The memo of successful signature checks (see the module's invariants).
static VERIFIED: parking_lot::Mutex<Memo> = parking_lot::Mutex::new(Memo {
    set: std::collections::BTreeSet::new(),
    order: std::collections::VecDeque::new(),
});

struct Memo {
    set: std::collections::BTreeSet<Hash>,
    order: std::collections::VecDeque<Hash>,
}

impl Memo {
    fn insert(&mut self, key: Hash) {
        if self.set.insert(key) {
            self.order.push_back(key);
            if self.order.len() > VERIFIED_MEMO {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

/// A signer's public key, parsed once when its certificate is learnt.
#[derive(Clone)]
enum PublicKey {
    /// Checked with a table of the key's multiples built when it is learnt
    /// ([`Ed25519Key`]).
    Ed25519(Arc<Ed25519Key>),
    /// ECDSA P-256 with SHA-256, checked by ring.
    P256(Arc<[u8]>),
}

impl PublicKey {
    fn parse(alg: &str, curve: Option<&str>, key: &[u8]) -> Result<Self, String> {
        match (alg, curve) {
            ("1.3.101.112", _) => {
                let bytes: &[u8; 32] = key
                    .try_into()
                    .map_err(|_| format!("an Ed25519 key of {} bytes", key.len()))?;
                Ed25519Key::shared(bytes).map(Self::Ed25519)
            }
            ("1.2.840.10045.2.1", Some("1.2.840.10045.3.1.7")) => Ok(Self::P256(key.into())),
            other => Err(format!("unsupported key {other:?}")),
        }
    }

    fn tag_and_bytes(&self) -> (u8, &[u8]) {
        match self {
            Self::Ed25519(k) => (1, &k.bytes),
            Self::P256(k) => (2, k),
        }
    }

    fn check(&self, message: &[u8], signature: &[u8]) -> bool {
        match self {
            Self::Ed25519(k) => k.check(message, signature),
            Self::P256(k) => {
                ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, k)
                    .verify(message, signature)
                    .is_ok()
            }
        }
    }
}

/// An Ed25519 public key `A` with the table that checks its signatures: `[k]A` is a
/// fixed-base multiplication by a table of `-A`'s multiples built once per signer and
/// process ([`crate::fixed_base`], 640 KiB, about 1.3 ms), as `[s]B` is by the basepoint's,
/// instead of a variable-base one per check. The values are all public, so the tables are
/// read in variable time: about 0.55 of curve25519-dalek's constant-time tables' time with cold
/// caches, which were themselves 70 % of ed25519-dalek's `verify_strict` (25 against 36 µs
/// on this machine's x86-64 with AVX2).
///
/// The check is RFC 8032's cofactorless equation, as ed25519-dalek's `verify`: `s` is
/// canonical (below the group order) and the encoding of `[s]B - [k]A`, with
/// `k = SHA-512(R || A || M)`, equals the signature's `R` bytes (which a non-canonical `R`
/// never does). A key of small order is refused when learnt. Unlike `verify_strict`, an
/// `R` with a small-order component is not refused: with the key's order large, such a
/// signature can only come from the key's holder (the core), and it is one fixed string,
/// so the seal links that hash it stay unique.
struct Ed25519Key {
    bytes: [u8; 32],
    neg_a: crate::fixed_base::Table,
}

/// The basepoint's table for [`Ed25519Key::check`], built on first use (640 KiB).
static BASEPOINT: std::sync::LazyLock<crate::fixed_base::Table> = std::sync::LazyLock::new(|| {
    crate::fixed_base::Table::new(&curve25519_dalek::constants::ED25519_BASEPOINT_POINT)
});

/// Builds [`BASEPOINT`] on a thread of its own, once per process: the first seal check of a
/// node comes on its join's path, a few milliseconds after it starts, and would otherwise
/// wait the 1.3 ms the table takes. A check that comes first waits for the build in
/// progress; if the thread cannot start, the first check builds the table.
fn prebuild_basepoint() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let _ = std::thread::Builder::new()
            .name("ed25519-table".into())
            .spawn(|| {
                std::sync::LazyLock::force(&BASEPOINT);
            });
    });
}

/// The Ed25519 keys that some node of this process knows, by their bytes: every node of a
/// process (`canopy demo`, tests) shares one table per signer.
static ED25519_KEYS: parking_lot::Mutex<BTreeMap<[u8; 32], std::sync::Weak<Ed25519Key>>> =
    parking_lot::Mutex::new(BTreeMap::new());

impl Ed25519Key {
    /// The key of `bytes`, with its table: the one another node of the process holds, or a
    /// new one.
    fn shared(bytes: &[u8; 32]) -> Result<Arc<Self>, String> {
        let mut keys = ED25519_KEYS.lock();
        if let Some(key) = keys.get(bytes).and_then(std::sync::Weak::upgrade) {
            return Ok(key);
        }
        keys.retain(|_, key| key.strong_count() > 0);
        let key = Arc::new(Self::new(bytes)?);
        keys.insert(*bytes, Arc::downgrade(&key));
        Ok(key)
    }

    fn new(bytes: &[u8; 32]) -> Result<Self, String> {
        let a = curve25519_dalek::edwards::CompressedEdwardsY(*bytes)
            .decompress()
            .ok_or("Ed25519 key: not a curve point")?;
        if a.is_small_order() {
            return Err("Ed25519 key: of small order (a weak key)".into());
        }
        Ok(Self {
            bytes: *bytes,
            neg_a: crate::fixed_base::Table::new(&-a),
        })
    }

    fn check(&self, message: &[u8], signature: &[u8]) -> bool {
        use curve25519_dalek::scalar::Scalar;
        use sha2::Digest;
        let Ok(signature) = <&[u8; 64]>::try_from(signature) else {
            return false;
        };
        let (r, s) = signature.split_at(32);
        let Some(s) = s
            .try_into()
            .ok()
            .and_then(|s| Option::<Scalar>::from(Scalar::from_canonical_bytes(s)))
        else {
            return false;
        };
        let k = Scalar::from_hash(
            sha2::Sha512::new()
                .chain_update(r)
                .chain_update(self.bytes)
                .chain_update(message),
        );
        let expected = self.neg_a.mul_add(BASEPOINT.mul(&s), &k);
        expected.compress().as_bytes() == r
    }
}

/// A relay's Ed25519 seal check on its own ([`Ed25519Key`]: the signer's table, no memo),
/// for comparing it with a reference outside this crate (the `ed25519` fuzz target).
#[doc(hidden)]
pub struct Ed25519Check(Arc<Ed25519Key>);

impl Ed25519Check {
    /// The check for the key `bytes`, sharing its table as nodes do; `BadCert` for what a
    /// node refuses to learn (no curve point, or a key of small order).
    pub fn new(bytes: &[u8; 32]) -> Result<Self, TrustError> {
        Ed25519Key::shared(bytes)
            .map(Self)
            .map_err(TrustError::BadCert)
    }

    /// Whether `signature` is a valid Ed25519 signature of `message` under this key.
    pub fn check(&self, message: &[u8], signature: &[u8]) -> bool {
        self.0.check(message, signature)
    }
}

/// What the memo remembers a check by.
fn memo_key(key: &PublicKey, message: &[u8], signature: &[u8]) -> Hash {
    let (tag, key_bytes) = key.tag_and_bytes();
    let mut h = blake3::Hasher::new();
    h.update(&[tag]);
    for part in [key_bytes, message, signature] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part);
    }
    *h.finalize().as_bytes()
}

/// Checks `signature` over `message` with `key`, through the memo.
fn verify_memoized(key: &PublicKey, message: &[u8], signature: &[u8]) -> bool {
    let memo_key = memo_key(key, message, signature);
    if VERIFIED.lock().set.contains(&memo_key) {
        return true;
    }
    let ok = key.check(message, signature);
    if ok {
        VERIFIED.lock().insert(memo_key);
    }
    ok
}

/// Why something was not trusted.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TrustError {
    /// A signer certificate that does not verify, has expired, or is not a core's.
    #[error("signer certificate refused: {0}")]
    BadCert(String),
    /// A signature by a key this node does not know.
    #[error("unknown signer {0}")]
    UnknownSigner(String),
    /// A signature that does not verify over the anchor.
    #[error("bad signature by {0}")]
    BadSignature(String),
    /// A malformed seal (field sizes).
    #[error("malformed seal: {0}")]
    Malformed(&'static str),
    /// Signing failed on a core node.
    #[error("signing: {0}")]
    Sign(String),
}

impl TrustError {
    /// A short stable label for metrics (`canopy_untrusted_frames_total{reason}`).
    pub fn label(&self) -> &'static str {
        match self {
            Self::BadCert(_) => "bad_cert",
            Self::UnknownSigner(_) => "unknown_signer",
            Self::BadSignature(_) => "bad_signature",
            Self::Malformed(_) => "malformed",
            Self::Sign(_) => "sign",
        }
    }
}

/// What a core signs: a version of the file, and for a seal, the entry that made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Anchor {
    pub version: u64,
    pub length: u64,
    pub chunk_size: u32,
    pub root: Hash,
    pub commit_time_us: u64,
    /// BLAKE3 of the entry frame's body, for the seal of that entry; `None` for the anchor of
    /// a state (what a snapshot or a restarted relay's copy is checked against).
    pub entry: Option<Hash>,
    /// For the seal of an entry: the [`link`] of the entry seal the same core node made
    /// before it ([`Sealer::seal`] fills it in); `None` otherwise.
    pub prev: Option<Hash>,
}

impl Anchor {
    /// The bytes that are signed.
    fn message(&self, cluster: &Hash) -> Vec<u8> {
        let mut m = Vec::with_capacity(DOMAIN.len() + 32 + 8 + 8 + 4 + 32 + 8 + 33);
        m.extend_from_slice(DOMAIN);
        m.extend_from_slice(cluster);
        m.extend_from_slice(&self.version.to_le_bytes());
        m.extend_from_slice(&self.length.to_le_bytes());
        m.extend_from_slice(&self.chunk_size.to_le_bytes());
        m.extend_from_slice(&self.root);
        m.extend_from_slice(&self.commit_time_us.to_le_bytes());
        match &self.entry {
            Some(h) => {
                m.push(1);
                m.extend_from_slice(h);
            }
            None => m.push(0),
        }
        if let Some(p) = &self.prev {
            m.push(1);
            m.extend_from_slice(p);
        }
        m
    }

    /// The anchor a seal claims, with the entry digest the verifier computed itself.
    pub fn of_seal(seal: &proto::Seal, entry: Option<Hash>) -> Result<Self, TrustError> {
        Ok(Self {
            version: seal.version,
            length: seal.length,
            chunk_size: seal.chunk_size,
            root: to_hash(&seal.root, "root")?,
            commit_time_us: seal.commit_time_unix_us,
            entry,
            prev: match seal.prev.len() {
                0 => None,
                _ => Some(to_hash(&seal.prev, "prev")?),
            },
        })
    }
}

const LINK_DOMAIN: &[u8] = b"canopy-seal-link-v1\0";

/// The link of a seal: BLAKE3 over its signed message and its signature. The next entry seal
/// of the same core node signs it as [`Anchor::prev`], so a run of seals that link up is
/// proven, byte for byte, by the signature of its last one.
fn link(message: &[u8], signature: &[u8]) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(LINK_DOMAIN);
    h.update(&(message.len() as u64).to_le_bytes());
    h.update(message);
    h.update(signature);
    *h.finalize().as_bytes()
}

/// The digest a seal of `entry_frame` signs: BLAKE3 of the frame's body (its bytes after
/// the length prefix), exactly as it travels.
pub fn entry_digest(entry_frame: &[u8]) -> Hash {
    *blake3::hash(
        entry_frame
            .get(crate::wire::PREFIX_LEN..)
            .unwrap_or_default(),
    )
    .as_bytes()
}

fn to_hash(b: &[u8], what: &'static str) -> Result<Hash, TrustError> {
    b.try_into().map_err(|_| TrustError::Malformed(what))
}

/// The seals among `frames` (each as received, with its decoded message) with the anchors
/// they claim, each seal paired with the entry frame right before it, as a replica pairs
/// them; a seal after anything else is left out. What [`Verifier::check_chain`] takes.
pub fn queued_seals<'a>(
    frames: impl Iterator<Item = (&'a Bytes, &'a proto::Downstream)>,
) -> Vec<(Anchor, &'a proto::Seal)> {
    use proto::downstream::Kind as Down;
    let mut out = Vec::new();
    let mut entry = None;
    for (frame, msg) in frames {
        match &msg.kind {
            Some(Down::Entry(_)) => entry = Some(entry_digest(frame)),
            Some(Down::Seal(s)) => {
                if let Some(a) = entry.take().and_then(|d| Anchor::of_seal(s, Some(d)).ok()) {
                    out.push((a, s));
                }
            }
            _ => entry = None,
        }
    }
    out
}

/// A signer certificate's fingerprint: BLAKE3 of its DER.
pub fn fingerprint(der: &[u8]) -> Hash {
    *blake3::hash(der).as_bytes()
}

/// A core node's signing side.
pub struct Sealer {
    cluster: Hash,
    key: Box<dyn rustls::sign::Signer>,
    fingerprint: Hash,
    cert: Bytes,
    /// The link of the last entry seal made ([`Anchor::prev`] of the next).
    last: parking_lot::Mutex<Option<Hash>>,
    /// Whether entry seals sign [`Anchor::prev`] ([`Sealer::chained`]).
    chain: bool,
}

impl Sealer {
    /// The sealer of a core node's identity.
    pub fn new(id: &Identity) -> Result<Self, TrustError> {
        let key = id
            .signing_key()
            .map_err(|e| TrustError::Sign(e.to_string()))?
            .choose_scheme(&[
                SignatureScheme::ED25519,
                SignatureScheme::ECDSA_NISTP256_SHA256,
            ])
            .ok_or_else(|| TrustError::Sign("the key is neither Ed25519 nor ECDSA P-256".into()))?;
        let cert = Bytes::copy_from_slice(id.cert_der());
        Ok(Self {
            cluster: id.cluster_id(),
            key,
            fingerprint: fingerprint(&cert),
            cert,
            last: parking_lot::Mutex::new(None),
            chain: true,
        })
    }

    /// The same sealer with entry seals chained (the default) or not: a relay older than
    /// the chains rebuilds the signed message without `prev` and refuses chained seals.
    pub fn chained(mut self, chain: bool) -> Self {
        self.chain = chain;
        self
    }

    /// This signer's certificate, for the nodes that must verify it.
    pub fn cert(&self) -> &Bytes {
        &self.cert
    }

    /// Signs `anchor` into a seal. The seal of an entry (`anchor.entry` set) signs, as
    /// `prev`, the link of the entry seal made before it (its own `prev` is ignored); call it
    /// for a node's entries in their order.
    pub fn seal(&self, anchor: &Anchor) -> Result<proto::Seal, TrustError> {
        let chained = anchor.entry.is_some() && self.chain;
        let mut last = self.last.lock();
        let anchor = Anchor {
            prev: if chained { *last } else { None },
            ..anchor.clone()
        };
        let message = anchor.message(&self.cluster);
        let signature = self
            .key
            .sign(&message)
            .map_err(|e| TrustError::Sign(e.to_string()))?;
        if chained {
            *last = Some(link(&message, &signature));
        }
        Ok(proto::Seal {
            version: anchor.version,
            length: anchor.length,
            chunk_size: anchor.chunk_size,
            root: Bytes::copy_from_slice(&anchor.root),
            commit_time_unix_us: anchor.commit_time_us,
            signer: Bytes::copy_from_slice(&self.fingerprint),
            scheme: u32::from(u16::from(self.key.scheme())),
            signature: Bytes::from(signature),
            prev: anchor
                .prev
                .map_or_else(Bytes::new, |p| Bytes::copy_from_slice(&p)),
        })
    }
}

/// A verified signer's key.
#[derive(Clone)]
struct Signer {
    name: String,
    /// The cluster id its signatures carry: BLAKE3 of the CA that issued its certificate.
    cluster: Hash,
    cert: Bytes,
    key: PublicKey,
    until: SystemTime,
}

/// The signers a node accepts, learnt from certificates it has checked.
#[derive(Clone)]
pub struct Verifier {
    id: Arc<Identity>,
    signers: BTreeMap<Hash, Signer>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("signers", &self.signers.len())
            .finish()
    }
}

impl Verifier {
    /// A verifier for the cluster of `id`, knowing no signer yet. Starts building the
    /// basepoint's table, once per process, on a thread of its own.
    pub fn new(id: Arc<Identity>) -> Self {
        prebuild_basepoint();
        Self {
            id,
            signers: BTreeMap::new(),
        }
    }

    /// Checks a signer certificate (size, chain to the cluster CA, validity at `now`, core
    /// role, a supported key) and keeps it. Returns whether it was new.
    pub fn learn(&mut self, der: &[u8], now: SystemTime) -> Result<bool, TrustError> {
        if der.len() > MAX_CERT_BYTES {
            return Err(TrustError::BadCert(format!("{} bytes", der.len())));
        }
        let fp = fingerprint(der);
        if self.signers.contains_key(&fp) {
            return Ok(false);
        }
        let crate::tls::Verified {
            name,
            role,
            until,
            cluster,
        } = self.id.verify_cert(der, now).map_err(TrustError::BadCert)?;
        if role != Role::Core {
            return Err(TrustError::BadCert(format!(
                "{name} has the {role} role, not core"
            )));
        }
        let (alg, key, curve) = crate::tls::public_key(der).map_err(TrustError::BadCert)?;
        let key = PublicKey::parse(&alg, curve.as_deref(), &key)
            .map_err(|e| TrustError::BadCert(format!("{name}: {e}")))?;
        if self.signers.len() >= MAX_SIGNERS {
            let soonest = self
                .signers
                .iter()
                .min_by_key(|(_, s)| s.until)
                .map(|(k, _)| *k);
            if let Some(k) = soonest {
                self.signers.remove(&k);
            }
        }
        self.signers.insert(
            fp,
            Signer {
                name,
                cluster,
                cert: Bytes::copy_from_slice(der),
                key,
                until,
            },
        );
        Ok(true)
    }

    /// Forgets signers whose certificate has expired at `now`.
    pub fn expire(&mut self, now: SystemTime) {
        self.signers.retain(|_, s| s.until > now);
    }

    /// The signer certificates known, to pass on to children.
    pub fn certs(&self) -> Vec<Bytes> {
        self.signers.values().map(|s| s.cert.clone()).collect()
    }

    /// Checks `seal` as a signature over `anchor` by a known core signer; returns the
    /// signer's name.
    pub fn verify(&self, anchor: &Anchor, seal: &proto::Seal) -> Result<&str, TrustError> {
        let fp = to_hash(&seal.signer, "signer")?;
        let signer = self
            .signers
            .get(&fp)
            .ok_or_else(|| TrustError::UnknownSigner(hex::encode(&fp[..8])))?;
        let message = anchor.message(&signer.cluster);
        if !verify_memoized(&signer.key, &message, &seal.signature) {
            return Err(TrustError::BadSignature(signer.name.clone()));
        }
        Ok(&signer.name)
    }

    /// For seals queued together, in their order: finds the runs in which each seal's `prev`
    /// is the link of the one before it (one known signer throughout), checks the signature
    /// of each run's last seal, and, where it holds, remembers the seals before it as
    /// checked, in the memo [`Verifier::verify`] consults: the links prove them byte for
    /// byte what the core signed, and the core signs validly. Returns how many it
    /// remembered. Nothing is shown or applied here; a seal not remembered is checked on its
    /// own as before.
    pub fn check_chain(&self, seals: &[(Anchor, &proto::Seal)]) -> usize {
        let mut proven = 0;
        let mut run: Vec<Linked> = Vec::new();
        for (anchor, seal) in seals {
            let item = self.linked(anchor, seal);
            let joins = match (run.last(), &item) {
                (Some(last), Some(it)) => it.fp == last.fp && it.prev == Some(last.link),
                _ => false,
            };
            if !joins {
                proven += Self::prove(std::mem::take(&mut run));
            }
            run.extend(item);
        }
        proven + Self::prove(run)
    }

    /// What [`Verifier::check_chain`] needs of one seal by a known signer.
    fn linked<'a>(&'a self, anchor: &Anchor, seal: &'a proto::Seal) -> Option<Linked<'a>> {
        let fp = to_hash(&seal.signer, "signer").ok()?;
        let signer = self.signers.get(&fp)?;
        let message = anchor.message(&signer.cluster);
        Some(Linked {
            fp,
            key: memo_key(&signer.key, &message, &seal.signature),
            link: link(&message, &seal.signature),
            prev: anchor.prev,
            message,
            signature: &seal.signature,
            signer,
        })
    }

    /// A run of linked seals: if it holds two or more and its last seal's signature
    /// verifies, remembers the others. Returns how many it remembered.
    fn prove(run: Vec<Linked>) -> usize {
        let Some((last, before)) = run.split_last() else {
            return 0;
        };
        if before.is_empty() || !verify_memoized(&last.signer.key, &last.message, last.signature) {
            return 0;
        }
        let mut memo = VERIFIED.lock();
        for it in before {
            memo.insert(it.key);
        }
        before.len()
    }
}

/// One seal as [`Verifier::check_chain`] links it.
struct Linked<'a> {
    fp: Hash,
    key: Hash,
    link: Hash,
    prev: Option<Hash>,
    message: Vec<u8>,
    signature: &'a [u8],
    signer: &'a Signer,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::tls;

    #[test]
    fn a_key_of_the_wrong_length_or_kind_is_refused_with_its_reason() {
        const ED25519: &str = "1.3.101.112";
        for len in [0, 31, 33, 65] {
            let e = PublicKey::parse(ED25519, None, &vec![9u8; len]).err();
            assert_eq!(e, Some(format!("an Ed25519 key of {len} bytes")));
        }
        let e = PublicKey::parse("1.2.840.10045.2.1", Some("1.3.132.0.34"), &[4u8; 97]).err();
        assert!(e.is_some_and(|e| e.starts_with("unsupported key")));
        let e = PublicKey::parse("1.2.840.113549.1.1.1", None, &[1u8; 270]).err();
        assert!(e.is_some_and(|e| e.starts_with("unsupported key")));
        let good = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]).verifying_key();
        let k = PublicKey::parse(ED25519, None, good.as_bytes()).expect("a valid key");
        assert_eq!(k.tag_and_bytes(), (1, &good.as_bytes()[..]));
    }

    fn ed25519_key(seed: u8) -> (ed25519_dalek::SigningKey, Ed25519Key) {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let key = Ed25519Key::new(sk.verifying_key().as_bytes()).expect("a valid key");
        (sk, key)
    }

    proptest::proptest! {
        #[test]
        fn the_ed25519_table_check_agrees_with_ed25519_dalek(
            seed in 1u8..=255,
            message in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            flip in 0usize..(64 + 300) * 8,
        ) {
            use ed25519_dalek::{Signer, Verifier as _};
            let (sk, key) = ed25519_key(seed);
            let vk = sk.verifying_key();
            let sig = sk.sign(&message).to_bytes();
            proptest::prop_assert!(key.check(&message, &sig));
            // One bit flipped anywhere in the signature or the message.
            let (mut sig2, mut msg2) = (sig, message.clone());
            let byte = flip / 8;
            if byte < 64 {
                sig2[byte] ^= 1 << (flip % 8);
            } else if byte - 64 < msg2.len() {
                msg2[byte - 64] ^= 1 << (flip % 8);
            } else {
                msg2.push(0);
            }
            let dalek = vk.verify(&msg2, &ed25519_dalek::Signature::from_bytes(&sig2)).is_ok();
            proptest::prop_assert!(!key.check(&msg2, &sig2));
            proptest::prop_assert_eq!(key.check(&msg2, &sig2), dalek);
        }
    }

    #[test]
    fn the_nodes_of_a_process_share_a_signers_table_until_the_last_lets_go() {
        let bytes = ed25519_dalek::SigningKey::from_bytes(&[201u8; 32])
            .verifying_key()
            .to_bytes();
        let a = Ed25519Key::shared(&bytes).expect("a valid key");
        let b = Ed25519Key::shared(&bytes).expect("a valid key");
        assert!(Arc::ptr_eq(&a, &b));
        let gone = Arc::downgrade(&a);
        drop((a, b));
        assert!(gone.upgrade().is_none());
        let c = Ed25519Key::shared(&bytes).expect("a valid key");
        assert!(ED25519_KEYS
            .lock()
            .get(&bytes)
            .and_then(std::sync::Weak::upgrade)
            .is_some_and(|k| Arc::ptr_eq(&k, &c)));
    }

    #[test]
    fn the_ed25519_table_check_refuses_what_ed25519_dalek_refuses() {
        use ed25519_dalek::Signer;
        let (sk, key) = ed25519_key(7);
        let sig = sk.sign(b"m").to_bytes();
        assert!(key.check(b"m", &sig));
        assert!(!key.check(b"m", &sig[..63]), "a short signature");
        assert!(!key.check(b"", &[]));
        // s + l: the same point equation, but a non-canonical scalar.
        // The group order l = 2^252 + 27742317777372353535851937790883648493, little-endian.
        let mut l = [0u8; 32];
        l[..16].copy_from_slice(&[
            0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9,
            0xde, 0x14,
        ]);
        l[31] = 0x10;
        let mut big = sig;
        let mut carry = 0u16;
        for i in 0..32 {
            let v = u16::from(big[32 + i]) + u16::from(l[i]) + carry;
            big[32 + i] = v as u8;
            carry = v >> 8;
        }
        assert!(!key.check(b"m", &big), "s + l accepted");
        // Another signer's key.
        let (_, other) = ed25519_key(8);
        assert!(!other.check(b"m", &sig));
        // A key of small order (the identity) and bytes that are no point.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(Ed25519Key::new(&identity).is_err_and(|e| e.contains("small order")));
        let not_a_point = (0u8..=255)
            .map(|b| [b; 32])
            .find(|b| {
                curve25519_dalek::edwards::CompressedEdwardsY(*b)
                    .decompress()
                    .is_none()
            })
            .expect("some byte string is no point");
        assert!(Ed25519Key::new(&not_a_point).is_err_and(|e| e.contains("not a curve point")));
    }

    fn identities(dir: &std::path::Path) -> (Identity, Identity, Identity) {
        let ca = dir.join("ca");
        tls::ca_init(&ca).unwrap();
        for (n, r) in [
            ("core-a", Role::Core),
            ("relay-a", Role::Relay),
            ("core-x", Role::Core),
        ] {
            tls::cert_issue(&ca, n, r, dir).unwrap();
        }
        let other = dir.join("other");
        tls::ca_init(&other.join("ca")).unwrap();
        tls::cert_issue(&other.join("ca"), "core-x", Role::Core, &other).unwrap();
        (
            Identity::load(dir, "core-a").unwrap(),
            Identity::load(dir, "relay-a").unwrap(),
            Identity::load(&other, "core-x").unwrap(),
        )
    }

    fn anchor(entry: Option<Hash>) -> Anchor {
        Anchor {
            version: 7,
            length: 100,
            chunk_size: 65536,
            root: [3; 32],
            commit_time_us: 42,
            entry,
            prev: None,
        }
    }

    /// A remembered check answers only the same question: another node that has not learnt
    /// the signer still refuses, and any changed byte of the signature is checked afresh.
    #[test]
    fn the_memo_of_checks_bypasses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (core, relay, _) = identities(dir.path());
        let now = SystemTime::now();
        let sealer = Sealer::new(&core).unwrap();
        let a = anchor(Some([5; 32]));
        let seal = sealer.seal(&a).unwrap();
        let mut first = Verifier::new(Arc::new(relay.clone()));
        first.learn(sealer.cert(), now).unwrap();
        assert_eq!(first.verify(&a, &seal), Ok("core-a"));
        assert_eq!(first.verify(&a, &seal), Ok("core-a"));
        let stranger = Verifier::new(Arc::new(relay));
        assert!(matches!(
            stranger.verify(&a, &seal),
            Err(TrustError::UnknownSigner(_))
        ));
        let mut bad = seal.clone();
        let mut sig = bad.signature.to_vec();
        let last = sig.len() - 1;
        sig[last] ^= 1;
        bad.signature = sig.into();
        assert_eq!(
            first.verify(&a, &bad),
            Err(TrustError::BadSignature("core-a".into()))
        );
    }

    #[test]
    fn a_core_seal_verifies_and_nothing_else_does() {
        let dir = tempfile::tempdir().unwrap();
        let (core, relay, foreign) = identities(dir.path());
        let now = SystemTime::now();
        let sealer = Sealer::new(&core).unwrap();
        let mut v = Verifier::new(Arc::new(relay.clone()));
        let a = anchor(Some([9; 32]));
        let seal = sealer.seal(&a).unwrap();
        assert_eq!(
            v.verify(&a, &seal),
            Err(TrustError::UnknownSigner(hex::encode(&seal.signer[..8])))
        );
        assert_eq!(v.learn(sealer.cert(), now), Ok(true));
        assert_eq!(v.learn(sealer.cert(), now), Ok(false));
        assert_eq!(v.verify(&a, &seal), Ok("core-a"));

        for changed in [
            Anchor {
                version: 8,
                ..a.clone()
            },
            Anchor {
                length: 101,
                ..a.clone()
            },
            Anchor {
                chunk_size: 4096,
                ..a.clone()
            },
            Anchor {
                root: [4; 32],
                ..a.clone()
            },
            Anchor {
                commit_time_us: 43,
                ..a.clone()
            },
            Anchor {
                entry: Some([8; 32]),
                ..a.clone()
            },
            Anchor {
                entry: None,
                ..a.clone()
            },
            Anchor {
                prev: Some([9; 32]),
                ..a.clone()
            },
        ] {
            assert_eq!(
                v.verify(&changed, &seal),
                Err(TrustError::BadSignature("core-a".into())),
                "{changed:?}"
            );
        }

        let relay_sealer = Sealer::new(&relay).unwrap();
        assert!(matches!(
            v.learn(relay_sealer.cert(), now),
            Err(TrustError::BadCert(m)) if m.contains("relay role")
        ));
        let foreign_sealer = Sealer::new(&foreign).unwrap();
        assert!(matches!(
            v.learn(foreign_sealer.cert(), now),
            Err(TrustError::BadCert(_))
        ));
        let forged = foreign_sealer.seal(&a).unwrap();
        assert!(matches!(
            v.verify(&a, &forged),
            Err(TrustError::UnknownSigner(_))
        ));
    }

    /// Seals by an Ed25519 core and a P-256 core of one cluster both verify, each says its
    /// scheme, and neither's signature passes for the other's.
    #[test]
    fn ed25519_and_p256_signers_both_verify() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        tls::ca_init_with(&ca, tls::KeyAlg::P256).unwrap();
        let valid = tls::NODE_VALIDITY;
        for (n, r, alg) in [
            ("core-ed", Role::Core, tls::KeyAlg::Ed25519),
            ("core-p", Role::Core, tls::KeyAlg::P256),
            ("relay-a", Role::Relay, tls::KeyAlg::Ed25519),
        ] {
            tls::cert_issue_with(&ca, n, r, dir.path(), valid, alg).unwrap();
        }
        let load = |n| Identity::load(dir.path(), n).unwrap();
        let ed = Sealer::new(&load("core-ed")).unwrap();
        let p = Sealer::new(&load("core-p")).unwrap();
        let now = SystemTime::now();
        let mut v = Verifier::new(Arc::new(load("relay-a")));
        v.learn(ed.cert(), now).unwrap();
        v.learn(p.cert(), now).unwrap();
        let a = anchor(Some([1; 32]));
        let (s_ed, s_p) = (ed.seal(&a).unwrap(), p.seal(&a).unwrap());
        assert_eq!(s_ed.scheme, u32::from(u16::from(SignatureScheme::ED25519)));
        assert_eq!(s_ed.signature.len(), 64);
        assert_eq!(
            s_p.scheme,
            u32::from(u16::from(SignatureScheme::ECDSA_NISTP256_SHA256))
        );
        assert_eq!(v.verify(&a, &s_ed), Ok("core-ed"));
        assert_eq!(v.verify(&a, &s_p), Ok("core-p"));
        for short in [63, 0] {
            let cut = proto::Seal {
                signature: s_ed.signature.slice(..short),
                ..s_ed.clone()
            };
            assert_eq!(
                v.verify(&a, &cut),
                Err(TrustError::BadSignature("core-ed".into()))
            );
        }
        let swapped = proto::Seal {
            signer: s_p.signer.clone(),
            ..s_ed.clone()
        };
        assert_eq!(
            v.verify(&a, &swapped),
            Err(TrustError::BadSignature("core-p".into()))
        );
    }

    #[test]
    fn expired_signers_are_refused_and_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let (core, relay, _) = identities(dir.path());
        let sealer = Sealer::new(&core).unwrap();
        let mut v = Verifier::new(Arc::new(relay));
        let later = SystemTime::now() + Duration::from_secs(20 * 365 * 86400);
        assert!(matches!(
            v.learn(sealer.cert(), later),
            Err(TrustError::BadCert(_))
        ));
        v.learn(sealer.cert(), SystemTime::now()).unwrap();
        assert_eq!(v.certs().len(), 1);
        v.expire(later);
        assert!(v.certs().is_empty());
    }

    /// Anchors of consecutive entries, each with a root of its own (the memo is process-wide,
    /// so every test seals something no other test sealed).
    fn entries(tag: u8, n: u64) -> Vec<Anchor> {
        (1..=n)
            .map(|i| Anchor {
                version: i,
                root: [tag.wrapping_add(i as u8); 32],
                entry: Some([tag; 32]),
                ..anchor(None)
            })
            .collect()
    }

    /// The anchor a receiver rebuilds from a seal (with the entry digest it computed).
    fn claimed(seal: &proto::Seal, entry: &Anchor) -> Anchor {
        Anchor::of_seal(seal, entry.entry).unwrap()
    }

    /// Each entry seal signs the link of the one before it, still verifies on its own, and a
    /// state's anchor neither carries a link nor breaks the chain of entries.
    #[test]
    fn entry_seals_link_up_and_each_still_verifies_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (core, relay, _) = identities(dir.path());
        let sealer = Sealer::new(&core).unwrap();
        let mut v = Verifier::new(Arc::new(relay));
        v.learn(sealer.cert(), SystemTime::now()).unwrap();
        let a = entries(0x10, 3);
        let s1 = sealer.seal(&a[0]).unwrap();
        let state = sealer.seal(&anchor(None)).unwrap();
        let s2 = sealer.seal(&a[1]).unwrap();
        let s3 = sealer.seal(&a[2]).unwrap();
        assert!(s1.prev.is_empty() && state.prev.is_empty());
        let cluster = core.cluster_id();
        let link_of = |s: &proto::Seal, e: &Anchor| {
            link(&claimed(s, e).message(&cluster), &s.signature).to_vec()
        };
        assert_eq!(s2.prev.to_vec(), link_of(&s1, &a[0]));
        assert_eq!(s3.prev.to_vec(), link_of(&s2, &a[1]));
        for (s, e) in [(&s1, &a[0]), (&s2, &a[1]), (&s3, &a[2])] {
            assert_eq!(v.verify(&claimed(s, e), s), Ok("core-a"));
        }
        assert_eq!(v.verify(&anchor(None), &state), Ok("core-a"));
        let unlinked = Anchor {
            prev: None,
            ..claimed(&s2, &a[1])
        };
        assert_eq!(
            v.verify(&unlinked, &s2),
            Err(TrustError::BadSignature("core-a".into()))
        );

        for bad in [vec![1u8; 7], vec![1u8; 33]] {
            let hostile = proto::Seal {
                prev: bad.into(),
                ..s2.clone()
            };
            assert_eq!(
                Anchor::of_seal(&hostile, a[1].entry),
                Err(TrustError::Malformed("prev"))
            );
        }
        let forged_prev = proto::Seal {
            prev: vec![9u8; 32].into(),
            ..s2.clone()
        };
        assert_eq!(
            v.verify(&claimed(&forged_prev, &a[1]), &forged_prev),
            Err(TrustError::BadSignature("core-a".into()))
        );

        let unchained = Sealer::new(&core).unwrap().chained(false);
        let b = entries(0x18, 2);
        let (u1, u2) = (
            unchained.seal(&b[0]).unwrap(),
            unchained.seal(&b[1]).unwrap(),
        );
        assert!(u1.prev.is_empty() && u2.prev.is_empty());
        assert_eq!(
            v.verify(&b[1], &u2),
            Ok("core-a"),
            "the message of old seals"
        );
    }

    /// A run of linked seals is proven by its last signature: the ones before it are then
    /// found in the memo. A changed signature or anchor anywhere, a forged last seal or a
    /// seal of an unknown signer in between proves nothing past it, and what was not proven
    /// is still checked on its own.
    #[test]
    fn a_chain_of_seals_is_proven_by_its_last_signature_only() {
        let dir = tempfile::tempdir().unwrap();
        let (core, relay, foreign) = identities(dir.path());
        let sealer = Sealer::new(&core).unwrap();
        let mut v = Verifier::new(Arc::new(relay));
        v.learn(sealer.cert(), SystemTime::now()).unwrap();
        let seal_all = |tag: u8| {
            let a = entries(tag, 4);
            let s: Vec<proto::Seal> = a.iter().map(|x| sealer.seal(x).unwrap()).collect();
            let c: Vec<Anchor> = s.iter().zip(&a).map(|(s, e)| claimed(s, e)).collect();
            (c, s)
        };
        let pairs = |c: &[Anchor], s: &[proto::Seal]| -> Vec<(Anchor, proto::Seal)> {
            c.iter().cloned().zip(s.iter().cloned()).collect()
        };
        let flip = |seal: &mut proto::Seal, byte: usize| {
            let mut sig = seal.signature.to_vec();
            sig[byte] ^= 1;
            seal.signature = sig.into();
        };
        let check = |items: &[(Anchor, proto::Seal)]| {
            let refs: Vec<(Anchor, &proto::Seal)> =
                items.iter().map(|(a, s)| (a.clone(), s)).collect();
            v.check_chain(&refs)
        };

        let (c, s) = seal_all(0x20);
        assert_eq!(check(&pairs(&c, &s)), 3);
        for (a, seal) in c.iter().zip(&s) {
            assert_eq!(v.verify(a, seal), Ok("core-a"));
        }
        assert_eq!(check(&pairs(&c[..1], &s[..1])), 0, "one seal is no run");

        let (c, s) = seal_all(0x30);
        let mut items = pairs(&c, &s);
        flip(&mut items[1].1, 0);
        assert_eq!(check(&items), 1, "only the run after the changed seal");
        assert_eq!(
            v.verify(&items[1].0, &items[1].1),
            Err(TrustError::BadSignature("core-a".into()))
        );
        assert_eq!(v.verify(&items[0].0, &items[0].1), Ok("core-a"));

        let (c, s) = seal_all(0x40);
        let mut items = pairs(&c, &s);
        items[1].0.root = [0xEE; 32];
        assert_eq!(check(&items), 1);
        assert_eq!(
            v.verify(&items[1].0, &items[1].1),
            Err(TrustError::BadSignature("core-a".into()))
        );

        let (c, s) = seal_all(0x50);
        let mut items = pairs(&c, &s);
        flip(&mut items[3].1, 5);
        assert_eq!(check(&items), 0, "a forged last seal proves nothing");
        assert_eq!(
            v.verify(&items[3].0, &items[3].1),
            Err(TrustError::BadSignature("core-a".into()))
        );
        for (a, seal) in &items[..3] {
            assert_eq!(v.verify(a, seal), Ok("core-a"));
        }

        let (c, s) = seal_all(0x60);
        let mut items = pairs(&c, &s);
        let stranger = Sealer::new(&foreign).unwrap().seal(&items[1].0).unwrap();
        items[1].1 = stranger;
        assert_eq!(check(&items), 1);
    }

    /// Each seal is paired with the entry right before it and claims that entry's digest; a
    /// seal after anything else (here a heartbeat) is left out.
    #[test]
    fn queued_seals_pair_each_seal_with_the_entry_before_it() {
        use proto::downstream::Kind as Down;
        let entry = |version| {
            Down::Entry(proto::Entry {
                version,
                prev_version: version - 1,
                ..Default::default()
            })
        };
        let seal = |version| {
            Down::Seal(proto::Seal {
                version,
                root: vec![7; 32].into(),
                ..Default::default()
            })
        };
        let frames: Vec<(Bytes, proto::Downstream)> = [
            entry(1),
            seal(1),
            entry(2),
            Down::Heartbeat(proto::Heartbeat::default()),
            seal(2),
            entry(3),
            seal(3),
            seal(4),
        ]
        .into_iter()
        .map(|k| {
            let msg = proto::Downstream { kind: Some(k) };
            (crate::wire::encode(&msg), msg)
        })
        .collect();
        let got = queued_seals(frames.iter().map(|(f, m)| (f, m)));
        let versions: Vec<u64> = got.iter().map(|(a, _)| a.version).collect();
        assert_eq!(versions, [1, 3]);
        assert_eq!(got[0].0.entry, Some(entry_digest(&frames[0].0)));
        assert_eq!(got[1].0.entry, Some(entry_digest(&frames[5].0)));
    }
}
