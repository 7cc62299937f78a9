//! Cluster CA, node certificates, and mutual-TLS quinn endpoints.
//!
//! Invariants:
//! - Every node certificate is signed directly by the cluster CA, valid for both `serverAuth` and
//!   `clientAuth`, for ten years unless issued for fewer days. Its subject is
//!   `CN=<name>, OU=<role>, O=canopy` (the role is `core`, `relay` or `reader`), and its SAN DNS
//!   names are [`SERVER_NAME`] and `<name>`.
//! - A certificate is trusted only while it chains to the cluster CA and is within its validity
//!   period: at the handshake (rustls/webpki), and by [`Identity::verify_cert`] for certificates
//!   that arrive as data (a core signer's).
//! - Node names are 1–63 ASCII characters from `[A-Za-z0-9_-]`, start with a letter or digit, and
//!   are never `ca` (which would collide with `ca.pem`).
//! - Keys are Ed25519 unless ECDSA P-256 is asked for ([`KeyAlg`]): a relay checks a core
//!   signature on every entry it receives, and Ed25519 verification costs about two thirds
//!   of P-256's. Both kinds are accepted everywhere, so a cluster can mix them.
//! - Private keys are written with mode 0600; `ca_init` never overwrites an existing `ca.key`.
//! - Endpoints only speak TLS 1.3 with ALPN `canopy/1` through the ring provider passed
//!   explicitly; the process-default crypto provider is never consulted.
//! - A server endpoint requires a client certificate chaining to the cluster CA; a client trusts
//!   only the cluster CA and presents its own certificate.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

/// Server name to use in `endpoint.connect(addr, SERVER_NAME)`: every node cert carries it.
pub const SERVER_NAME: &str = "canopy";

/// ALPN protocol identifier negotiated on every connection.
pub const ALPN: &[u8] = b"canopy/1";

const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key";
const CA_COMMON_NAME: &str = "canopy cluster CA";
const ORGANIZATION: &str = "canopy";
const DAY: Duration = Duration::from_secs(24 * 60 * 60);
/// How long a node certificate is valid unless issued for fewer days (ten years).
pub const NODE_VALIDITY: Duration = Duration::from_secs(3653 * 24 * 60 * 60);
const CA_VALIDITY: Duration = Duration::from_secs(7305 * 24 * 60 * 60);

/// Errors from certificate management and endpoint construction.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: no such file", .0.display())]
    MissingFile(PathBuf),
    #[error("{}: already exists, refusing to overwrite", .0.display())]
    AlreadyExists(PathBuf),
    #[error("{}: invalid PEM: {reason}", path.display())]
    BadPem { path: PathBuf, reason: String },
    #[error("{}: no certificate in file", .0.display())]
    NoCertificate(PathBuf),
    #[error("{}: no private key in file", .0.display())]
    NoPrivateKey(PathBuf),
    #[error("{}: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("invalid node name {0:?}: use 1-63 characters from [A-Za-z0-9_-], not starting with '-' or '_', and not \"ca\"")]
    BadName(String),
    #[error("invalid role {0:?}: expected \"core\", \"relay\" or \"reader\"")]
    BadRole(String),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("TLS configuration has no QUIC-compatible initial cipher suite")]
    NoQuicCipherSuite,
    #[error("bind {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("creating QUIC endpoint: {0}")]
    Endpoint(io::Error),
    #[error("no async runtime: endpoints must be created inside a tokio runtime")]
    NoRuntime,
}

/// What a node does in the cluster; carried in its certificate's OU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// A Raft member: orders and signs what it commits.
    Core,
    /// A relay that may write (its writes are forwarded to the core).
    Relay,
    /// A relay that may only read: it follows, keeps its file and serves children and
    /// backfill, but the core refuses its writes.
    Reader,
}

impl Role {
    /// The lowercase name used in certificates and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Core => "core",
            Role::Relay => "relay",
            Role::Reader => "reader",
        }
    }

    /// Whether writes from a node with this role are accepted.
    pub fn may_write(self) -> bool {
        matches!(self, Role::Core | Role::Relay)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = TlsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "core" => Ok(Role::Core),
            "relay" => Ok(Role::Relay),
            "reader" => Ok(Role::Reader),
            other => Err(TlsError::BadRole(other.to_string())),
        }
    }
}

/// A node's loaded identity: its certificate chain and key, plus the cluster CA roots.
#[derive(Clone)]
pub struct Identity {
    pub name: String,
    pub role: Role,
    certs: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    roots: Arc<RootCertStore>,
    /// Each CA certificate of `ca.pem` (two while a CA is rotated) with its own root store.
    cas: Vec<(CertificateDer<'static>, Arc<RootCertStore>)>,
    /// BLAKE3 of the CA certificate that issued this node's certificate.
    cluster: [u8; 32],
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads `DIR/ca.pem`, `DIR/NAME.pem` and `DIR/NAME.key`, checking that the certificate is
    /// for `name`, carries a role, matches the key, and is currently valid under the CA.
    pub fn load(dir: &Path, name: &str) -> Result<Identity, TlsError> {
        check_name(name)?;
        let ca_path = dir.join(CA_CERT_FILE);
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key"));

        let ca_certs = read_certs(&ca_path)?;
        let certs = read_certs(&cert_path)?;
        let key = read_key(&key_path)?;

        let mut roots = RootCertStore::empty();
        let mut cas = Vec::new();
        for ca in &ca_certs {
            let mut one = RootCertStore::empty();
            if one.add(ca.clone()).is_ok() {
                cas.push((ca.clone(), Arc::new(one)));
            }
        }
        for ca in ca_certs {
            roots.add(ca).map_err(|e| TlsError::BadCertificate {
                path: ca_path.clone(),
                reason: format!("unusable as a trust anchor: {e}"),
            })?;
        }

        let (cert_name, role) =
            name_and_role(&certs[0]).map_err(|reason| TlsError::BadCertificate {
                path: cert_path.clone(),
                reason,
            })?;
        if cert_name != name {
            return Err(TlsError::BadCertificate {
                path: cert_path,
                reason: format!("certificate is for node {cert_name:?}, not {name:?}"),
            });
        }

        let signing_key = provider()
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| TlsError::BadPem {
                path: key_path.clone(),
                reason: format!("unsupported private key: {e}"),
            })?;
        rustls::sign::CertifiedKey::new(certs.clone(), signing_key)
            .keys_match()
            .map_err(|e| TlsError::BadCertificate {
                path: cert_path.clone(),
                reason: format!("does not match {}: {e}", key_path.display()),
            })?;

        let roots = Arc::new(roots);
        // Test-only: `CANOPY_FAILPOINT_ALLOW_EXPIRED=1` loads an expired certificate (checked
        // as of its start), so a test can show that peers refuse it.
        let at = match std::env::var("CANOPY_FAILPOINT_ALLOW_EXPIRED").as_deref() {
            Ok("1") => validity(&certs[0])
                .ok()
                .and_then(|(from, _)| from.duration_since(UNIX_EPOCH).ok())
                .map(|d| UnixTime::since_unix_epoch(d + Duration::from_secs(1)))
                .unwrap_or_else(UnixTime::now),
            _ => UnixTime::now(),
        };
        WebPkiClientVerifier::builder_with_provider(roots.clone(), Arc::new(provider()))
            .build()?
            .verify_client_cert(&certs[0], &certs[1..], at)
            .map_err(|e| TlsError::BadCertificate {
                path: cert_path.clone(),
                reason: format!("not valid under {}: {e}", ca_path.display()),
            })?;

        let cluster = issuer(&cas, &certs[0], at).unwrap_or([0; 32]);
        Ok(Identity {
            name: name.to_string(),
            role,
            certs,
            key: Arc::new(key),
            roots,
            cas,
            cluster,
        })
    }

    /// The cluster's id as this node signs it: BLAKE3 of the CA certificate that issued its
    /// own certificate. Signatures name it, so one cluster's never verify in another.
    pub fn cluster_id(&self) -> [u8; 32] {
        self.cluster
    }

    /// This node's certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.certs[0]
    }

    /// This node's private key as a signer (the key its certificate certifies).
    pub fn signing_key(&self) -> Result<Arc<dyn rustls::sign::SigningKey>, TlsError> {
        provider()
            .key_provider
            .load_private_key(self.key.clone_key())
            .map_err(TlsError::Rustls)
    }

    /// When this node's own certificate expires.
    pub fn not_after(&self) -> SystemTime {
        validity(&self.certs[0]).map_or(UNIX_EPOCH, |(_, until)| until)
    }

    /// Checks a certificate that arrived as data: it must chain to a CA of `ca.pem` and be
    /// valid at `now`. Returns its name, role, the end of its validity, and the cluster id
    /// its signatures carry (BLAKE3 of the CA that issued it).
    pub fn verify_cert(&self, der: &[u8], now: SystemTime) -> Result<Verified, String> {
        let cert = CertificateDer::from(der.to_vec());
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let cluster = issuer(&self.cas, &cert, UnixTime::since_unix_epoch(since))
            .ok_or("not issued by the cluster CA, or not valid now")?;
        let (name, role) = name_and_role(&cert)?;
        let (_, until) = validity(&cert)?;
        Ok(Verified {
            name,
            role,
            until,
            cluster,
        })
    }
}

/// A certificate that [`Identity::verify_cert`] accepted.
#[derive(Clone, Debug)]
pub struct Verified {
    pub name: String,
    pub role: Role,
    pub until: SystemTime,
    /// BLAKE3 of the CA certificate that issued it.
    pub cluster: [u8; 32],
}

/// The id (BLAKE3) of the CA among `cas` under which `cert` verifies at `at`.
fn issuer(
    cas: &[(CertificateDer<'static>, Arc<RootCertStore>)],
    cert: &CertificateDer<'_>,
    at: UnixTime,
) -> Option<[u8; 32]> {
    cas.iter().find_map(|(ca, roots)| {
        WebPkiClientVerifier::builder_with_provider(roots.clone(), Arc::new(provider()))
            .build()
            .ok()?
            .verify_client_cert(cert, &[], at)
            .ok()
            .map(|_| *blake3::hash(ca).as_bytes())
    })
}

/// A certificate's validity period.
fn validity(der: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unparseable certificate: {e}"))?;
    let v = cert.validity();
    let at = |t: i64| UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    Ok((at(v.not_before.timestamp()), at(v.not_after.timestamp())))
}

/// The subject public key of a certificate: its algorithm OID and raw key bytes.
pub fn public_key(der: &[u8]) -> Result<(String, Vec<u8>, Option<String>), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unparseable certificate: {e}"))?;
    let spki = cert.public_key();
    let alg = spki.algorithm.algorithm.to_id_string();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    Ok((alg, spki.subject_public_key.data.to_vec(), curve))
}

/// Transport tuning used by both the server and the client side of an endpoint.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    pub idle_timeout: Duration,
    pub keep_alive: Duration,
    pub stream_window: u64,
    pub conn_window: u64,
    pub max_concurrent_bidi: u32,
    /// Ask the peer to acknowledge every ack-eliciting packet at once (QUIC ACK frequency
    /// extension, threshold 0) instead of every other one or after its 25 ms delayed-ACK timer.
    /// Default on: a tree link mostly carries one small entry per write, and a delayed ACK
    /// is a second wake-up of the child for every write (and of the parent for every child),
    /// where an immediate one leaves in the same wake-up as the entry's processing. A burst
    /// read in one receive is acknowledged once either way: quinn builds one ACK for all it
    /// received before it next transmits. Lazy ACKs (a threshold of 16 or 32 and a long
    /// delay) cannot batch writes 50 ms apart: quinn asks for at most max(RTT, 25 ms) of
    /// delay, so each lone entry is still acknowledged, from a timer. Measured with 100 relay
    /// processes at 20 writes/s, alternated in one sitting (docs/benchmarks.md, "Where a
    /// delivery's CPU goes"): 404-442 CPU-µs and 2.6-2.8 voluntary context switches per
    /// delivery, against 469-512 and 4.4-4.5 with quinn's default and 452-568 and 3.8-4.6
    /// lazy, in each of 3 rounds; bulk transfers unchanged (session 6).
    pub immediate_ack: bool,
    /// Receive and send buffer asked of the kernel for the endpoint's UDP socket (bytes; 0:
    /// the kernel's default). See `stream.udp_buffer_bytes`.
    pub udp_buffer: usize,
    /// Upper bound of MTU discovery: the largest UDP payload this endpoint sends on a path
    /// that carries it, and accepts (bytes, [`MIN_UDP_PAYLOAD`] to [`MAX_UDP_PAYLOAD`]). See
    /// `stream.max_udp_payload_bytes`.
    pub max_udp_payload: u16,
}

/// Default [`TransportConfig::max_udp_payload`]: a 9000-byte jumbo frame less the IPv6 (40)
/// and UDP (8) headers.
pub const DEFAULT_MAX_UDP_PAYLOAD: u16 = 8952;
/// The smallest UDP payload QUIC allows (RFC 9000 section 14); at this bound MTU discovery
/// is off.
pub const MIN_UDP_PAYLOAD: u16 = 1200;
/// The largest UDP payload of an IPv4 datagram (65535 less the IPv4 and UDP headers).
pub const MAX_UDP_PAYLOAD: u16 = 65507;

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            idle_timeout: Duration::from_secs(3),
            keep_alive: Duration::from_millis(500),
            stream_window: 16 * 1024 * 1024,
            conn_window: 64 * 1024 * 1024,
            max_concurrent_bidi: 256,
            immediate_ack: true,
            udp_buffer: 2 * 1024 * 1024,
            max_udp_payload: DEFAULT_MAX_UDP_PAYLOAD,
        }
    }
}

impl TransportConfig {
    /// [`TransportConfig::max_udp_payload`] within what QUIC and IPv4 allow.
    fn udp_payload(&self) -> u16 {
        self.max_udp_payload.clamp(MIN_UDP_PAYLOAD, MAX_UDP_PAYLOAD)
    }

    fn to_quinn(&self) -> Arc<quinn::TransportConfig> {
        let clamp = |v: u64| quinn::VarInt::from_u64(v).unwrap_or(quinn::VarInt::MAX);
        let mut t = quinn::TransportConfig::default();
        t.max_idle_timeout(quinn::IdleTimeout::try_from(self.idle_timeout).ok())
            .keep_alive_interval(Some(self.keep_alive))
            .stream_receive_window(clamp(self.stream_window))
            .receive_window(clamp(self.conn_window))
            .send_window(self.conn_window)
            .max_concurrent_bidi_streams(quinn::VarInt::from_u32(self.max_concurrent_bidi));
        let payload = self.udp_payload();
        if payload > MIN_UDP_PAYLOAD {
            let mut mtud = quinn::MtuDiscoveryConfig::default();
            mtud.upper_bound(payload);
            t.mtu_discovery_config(Some(mtud));
        } else {
            t.mtu_discovery_config(None);
        }
        if self.immediate_ack {
            let mut ack = quinn::AckFrequencyConfig::default();
            ack.ack_eliciting_threshold(quinn::VarInt::from_u32(0));
            t.ack_frequency_config(Some(ack));
        }
        Arc::new(t)
    }
}

/// The kind of key a new certificate gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyAlg {
    /// Ed25519: the default (cheapest to verify, and every entry's seal is verified by every
    /// relay).
    #[default]
    Ed25519,
    /// ECDSA over P-256 with SHA-256, for deployments whose policy requires a NIST curve.
    P256,
}

impl KeyAlg {
    /// The name `--key` takes and prints.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ed25519 => "ed25519",
            Self::P256 => "p256",
        }
    }

    fn generate(self) -> Result<KeyPair, rcgen::Error> {
        KeyPair::generate_for(match self {
            Self::Ed25519 => &rcgen::PKCS_ED25519,
            Self::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        })
    }
}

impl fmt::Display for KeyAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyAlg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ed25519" => Ok(Self::Ed25519),
            "p256" => Ok(Self::P256),
            other => Err(format!(
                "unknown key kind {other:?}: expected ed25519 or p256"
            )),
        }
    }
}

/// Writes `DIR/ca.pem` and `DIR/ca.key` (key 0600), creating `DIR` if needed.
/// Refuses to overwrite an existing `ca.key`.
pub fn ca_init(out: &Path) -> Result<(), TlsError> {
    ca_init_with(out, KeyAlg::default())
}

/// [`ca_init`] with a key of kind `alg`.
pub fn ca_init_with(out: &Path, alg: KeyAlg) -> Result<(), TlsError> {
    let key_path = out.join(CA_KEY_FILE);
    if key_path.exists() {
        return Err(TlsError::AlreadyExists(key_path));
    }
    fs::create_dir_all(out).map_err(|source| TlsError::Io {
        path: out.to_path_buf(),
        source,
    })?;

    let key = alg.generate()?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    params
        .distinguished_name
        .push(DnType::OrganizationName, ORGANIZATION);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, CA_VALIDITY);
    let cert = params.self_signed(&key)?;

    write_file(&key_path, key.serialize_pem().as_bytes(), true, true)?;
    write_file(&out.join(CA_CERT_FILE), cert.pem().as_bytes(), false, false)
}

/// Writes `OUT/NAME.pem`, `OUT/NAME.key` (0600) and `OUT/ca.pem`, creating `OUT` if needed.
/// The certificate is signed by the CA in `ca_dir`; see the module invariants for its contents.
pub fn cert_issue(ca_dir: &Path, name: &str, role: Role, out: &Path) -> Result<(), TlsError> {
    cert_issue_valid(ca_dir, name, role, out, NODE_VALIDITY)
}

/// [`cert_issue`] for a certificate valid for `validity` from now (it is back-dated a day for
/// clock skew, so a validity of zero issues one that has already expired).
pub fn cert_issue_valid(
    ca_dir: &Path,
    name: &str,
    role: Role,
    out: &Path,
    validity: Duration,
) -> Result<(), TlsError> {
    cert_issue_with(ca_dir, name, role, out, validity, KeyAlg::default())
}

/// [`cert_issue_valid`] with a key of kind `alg`.
pub fn cert_issue_with(
    ca_dir: &Path,
    name: &str,
    role: Role,
    out: &Path,
    validity: Duration,
    alg: KeyAlg,
) -> Result<(), TlsError> {
    check_name(name)?;
    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let ca_pem = read_string(&ca_cert_path)?;
    let ca_key_pem = read_string(&ca_key_path)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| TlsError::BadPem {
        path: ca_key_path.clone(),
        reason: e.to_string(),
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| TlsError::BadPem {
        path: ca_cert_path.clone(),
        reason: e.to_string(),
    })?;

    let key = alg.generate()?;
    let mut params = CertificateParams::new(vec![SERVER_NAME.to_string(), name.to_string()])?;
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, role.as_str());
    params
        .distinguished_name
        .push(DnType::OrganizationName, ORGANIZATION);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, validity);
    let cert = params.signed_by(&key, &issuer)?;

    fs::create_dir_all(out).map_err(|source| TlsError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    write_file(
        &out.join(format!("{name}.key")),
        key.serialize_pem().as_bytes(),
        true,
        false,
    )?;
    write_file(
        &out.join(format!("{name}.pem")),
        cert.pem().as_bytes(),
        false,
        false,
    )?;
    write_file(&out.join(CA_CERT_FILE), ca_pem.as_bytes(), false, false)
}

/// The quinn server configuration for `id`: client certificates must chain to the cluster CA.
pub fn server_config(id: &Identity, tc: &TransportConfig) -> Result<quinn::ServerConfig, TlsError> {
    let provider = Arc::new(provider());
    let verifier =
        WebPkiClientVerifier::builder_with_provider(id.roots.clone(), provider.clone()).build()?;
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.certs.clone(), id.key.clone_key())?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(crypto).map_err(|_| TlsError::NoQuicCipherSuite)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(tc.to_quinn());
    Ok(config)
}

/// The quinn client configuration for `id`: presents our certificate and trusts only the cluster CA.
pub fn client_config(id: &Identity, tc: &TransportConfig) -> Result<quinn::ClientConfig, TlsError> {
    let mut crypto = rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(id.roots.clone())
        .with_client_auth_cert(id.certs.clone(), id.key.clone_key())?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(crypto).map_err(|_| TlsError::NoQuicCipherSuite)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(tc.to_quinn());
    Ok(config)
}

/// A quinn endpoint bound to `addr` that accepts only peers whose client certificate chains to the
/// cluster CA, and whose default client config presents our cert and verifies the server's chain.
/// Must be called inside a tokio runtime.
pub fn endpoint(
    addr: SocketAddr,
    id: &Identity,
    tc: &TransportConfig,
) -> Result<quinn::Endpoint, TlsError> {
    let sock = UdpSocket::bind(addr).map_err(|source| TlsError::Bind { addr, source })?;
    endpoint_from_socket(sock, id, tc)
}

/// Same as [`endpoint`], from an already-bound UDP socket.
pub fn endpoint_from_socket(
    sock: UdpSocket,
    id: &Identity,
    tc: &TransportConfig,
) -> Result<quinn::Endpoint, TlsError> {
    tokio::runtime::Handle::try_current().map_err(|_| TlsError::NoRuntime)?;
    let payload = tc.udp_payload();
    let runtime = Arc::new(crate::runtime::ExactTimers::new(payload));
    report_buffers(&sock, tc.udp_buffer);
    let mut ec = quinn::EndpointConfig::default();
    // Accepting at least quinn's default keeps peers with a smaller bound interoperable.
    ec.max_udp_payload_size(payload.max(1472)).map_err(|e| {
        TlsError::Endpoint(io::Error::other(format!("max_udp_payload {payload}: {e}")))
    })?;
    let mut endpoint = quinn::Endpoint::new(ec, Some(server_config(id, tc)?), sock, runtime)
        .map_err(TlsError::Endpoint)?;
    endpoint.set_default_client_config(client_config(id, tc)?);
    Ok(endpoint)
}

/// Sizes the socket's buffers as `tc.udp_buffer` asks and says what the kernel granted: at
/// debug level, or once per process as a warning when it granted less.
fn report_buffers(sock: &UdpSocket, asked: usize) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let addr = sock.local_addr().ok();
    match crate::udp::size_buffers(sock, asked) {
        Ok(b) => match b.shortfall(asked) {
            Some(msg) => WARNED.call_once(|| tracing::warn!(?addr, "{msg}")),
            None => tracing::debug!(?addr, receive = b.receive, send = b.send, "UDP buffers"),
        },
        Err(e) => WARNED.call_once(|| tracing::warn!(?addr, "UDP buffers left as they are: {e}")),
    }
}

/// When the peer's certificate on an established connection expires (`None` if absent or
/// unparseable).
pub fn peer_not_after(conn: &quinn::Connection) -> Option<SystemTime> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    validity(certs.first()?).ok().map(|(_, until)| until)
}

/// Name and role from the peer's certificate on an established connection
/// (`None` if absent or unparseable).
pub fn peer_identity(conn: &quinn::Connection) -> Option<(String, Role)> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    name_and_role(certs.first()?).ok()
}

fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

fn check_name(name: &str) -> Result<(), TlsError> {
    let ok = (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && name != "ca";
    if ok {
        Ok(())
    } else {
        Err(TlsError::BadName(name.to_string()))
    }
}

fn name_and_role(der: &CertificateDer<'_>) -> Result<(String, Role), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unparseable certificate: {e}"))?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or("certificate has no common name")?;
    let role = subject
        .iter_organizational_unit()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or("certificate has no role (OU)")?;
    let role = role
        .parse()
        .map_err(|_| format!("certificate has unknown role {role:?}"))?;
    Ok((name.to_string(), role))
}

fn set_validity(params: &mut CertificateParams, lifetime: Duration) {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    params.not_before = now - DAY;
    // A second short, so a lifetime of zero issues a certificate that has already expired.
    params.not_after = now + lifetime - Duration::from_secs(1);
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => TlsError::MissingFile(path.to_path_buf()),
        _ => TlsError::Io {
            path: path.to_path_buf(),
            source,
        },
    })
}

fn read_string(path: &Path) -> Result<String, TlsError> {
    String::from_utf8(read_bytes(path)?).map_err(|_| TlsError::BadPem {
        path: path.to_path_buf(),
        reason: "not UTF-8 text".to_string(),
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = read_bytes(path)?;
    let certs = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = read_bytes(path)?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|e| TlsError::BadPem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?
        .ok_or_else(|| TlsError::NoPrivateKey(path.to_path_buf()))
}

fn write_file(
    path: &Path,
    contents: &[u8],
    secret: bool,
    create_new: bool,
) -> Result<(), TlsError> {
    let io_err = |source: io::Error| match source.kind() {
        io::ErrorKind::AlreadyExists => TlsError::AlreadyExists(path.to_path_buf()),
        _ => TlsError::Io {
            path: path.to_path_buf(),
            source,
        },
    };
    let mut opts = fs::OpenOptions::new();
    opts.write(true);
    if create_new {
        opts.create_new(true);
    } else {
        opts.create(true).truncate(true);
    }
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut file = opts.open(path).map_err(io_err)?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io_err)?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    file.write_all(contents).map_err(io_err)?;
    file.sync_all().map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    struct Cluster {
        _dir: tempfile::TempDir,
        ca: PathBuf,
        nodes: PathBuf,
    }

    fn cluster() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        let nodes = dir.path().join("nodes");
        ca_init(&ca).unwrap();
        Cluster {
            _dir: dir,
            ca,
            nodes,
        }
    }

    impl Cluster {
        fn identity(&self, name: &str, role: Role) -> Identity {
            cert_issue(&self.ca, name, role, &self.nodes).unwrap();
            Identity::load(&self.nodes, name).unwrap()
        }
    }

    fn local_endpoint(id: &Identity) -> quinn::Endpoint {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        endpoint_from_socket(sock, id, &TransportConfig::default()).unwrap()
    }

    fn addr(ep: &quinn::Endpoint) -> SocketAddr {
        ep.local_addr().unwrap()
    }

    #[test]
    fn role_roundtrips_through_strings() {
        for role in [Role::Core, Role::Relay] {
            assert_eq!(role.to_string().parse::<Role>().unwrap(), role);
        }
        assert!(matches!("leaf".parse::<Role>(), Err(TlsError::BadRole(_))));
    }

    #[tokio::test]
    async fn same_ca_nodes_connect_and_see_each_other() {
        let c = cluster();
        let core = c.identity("core-1", Role::Core);
        let relay = c.identity("relay_7", Role::Relay);
        assert_eq!((core.name.as_str(), core.role), ("core-1", Role::Core));
        assert_eq!((relay.name.as_str(), relay.role), ("relay_7", Role::Relay));

        let server = local_endpoint(&core);
        let client = local_endpoint(&relay);
        let server_addr = addr(&server);

        let accept = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let peer = peer_identity(&conn);
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let mut b = [0u8; 1];
            recv.read_exact(&mut b).await.unwrap();
            send.write_all(&[b[0] + 1]).await.unwrap();
            send.finish().unwrap();
            conn.closed().await;
            peer
        });

        let conn = client
            .connect(server_addr, SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        assert_eq!(
            peer_identity(&conn),
            Some(("core-1".to_string(), Role::Core))
        );
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&[41]).await.unwrap();
        send.finish().unwrap();
        let mut b = [0u8; 1];
        recv.read_exact(&mut b).await.unwrap();
        assert_eq!(b[0], 42);
        assert!(
            conn.stats().frame_rx.ack_frequency >= 1,
            "the server asks for immediate ACKs: {:?}",
            conn.stats().frame_rx
        );
        conn.close(0u32.into(), b"done");

        assert_eq!(
            accept.await.unwrap(),
            Some(("relay_7".to_string(), Role::Relay))
        );
        client.wait_idle().await;
    }

    /// Streams `bytes` from a client to a server built with `tc` on loopback and returns the
    /// client connection's path statistics once the server has read everything.
    async fn stream_over_loopback(tc: &TransportConfig, bytes: usize) -> quinn::PathStats {
        let c = cluster();
        let server_id = c.identity("core-1", Role::Core);
        let client_id = c.identity("relay-1", Role::Relay);
        let bind = || UdpSocket::bind("127.0.0.1:0").unwrap();
        let server = endpoint_from_socket(bind(), &server_id, tc).unwrap();
        let client = endpoint_from_socket(bind(), &client_id, tc).unwrap();
        let server_addr = addr(&server);
        let read = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let mut recv = conn.accept_uni().await.unwrap();
            let got = recv.read_to_end(usize::MAX).await.unwrap();
            conn.close(0u32.into(), b"done");
            got.len()
        });
        let conn = client
            .connect(server_addr, SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let mut send = conn.open_uni().await.unwrap();
        let chunk = vec![7u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            send.write_all(&chunk[..n]).await.unwrap();
            left -= n;
        }
        send.finish().unwrap();
        assert_eq!(read.await.unwrap(), bytes, "the server read every byte");
        let path = conn.stats().path;
        conn.close(0u32.into(), b"done");
        client.wait_idle().await;
        path
    }

    /// Loopback carries 64 KiB datagrams, so MTU discovery climbs to the configured bound,
    /// and the segmentation-offload batches of that size still fit one UDP send: had a batch
    /// exceeded 64 KiB, the kernel would refuse every full batch and most packets of a bulk
    /// transfer would count as lost.
    #[tokio::test]
    async fn bulk_transfers_use_jumbo_datagrams_where_the_path_carries_them() {
        let tc = TransportConfig::default();
        assert_eq!(tc.max_udp_payload, DEFAULT_MAX_UDP_PAYLOAD);
        let path = stream_over_loopback(&tc, 16 * 1024 * 1024).await;
        assert_eq!(
            path.current_mtu, DEFAULT_MAX_UDP_PAYLOAD,
            "MTU discovery reaches the bound on loopback: {path:?}"
        );
        assert!(
            path.lost_packets * 10 < path.sent_packets,
            "a tenth or more of the packets were lost: {path:?}"
        );
    }

    #[tokio::test]
    async fn the_smallest_payload_bound_turns_mtu_discovery_off() {
        let tc = TransportConfig {
            max_udp_payload: MIN_UDP_PAYLOAD,
            ..TransportConfig::default()
        };
        let path = stream_over_loopback(&tc, 1024 * 1024).await;
        assert_eq!(path.current_mtu, MIN_UDP_PAYLOAD, "{path:?}");
    }

    /// Every pairing of key kinds (CA, server, client) completes a mutual-TLS handshake, and
    /// each certificate carries the key it was issued with.
    #[tokio::test]
    async fn ed25519_and_p256_keys_mix_in_one_cluster() {
        for ca_alg in [KeyAlg::Ed25519, KeyAlg::P256] {
            let dir = tempfile::tempdir().unwrap();
            let ca = dir.path().join("ca");
            let nodes = dir.path().join("nodes");
            ca_init_with(&ca, ca_alg).unwrap();
            let issue = |name: &str, role, alg| {
                cert_issue_with(&ca, name, role, &nodes, NODE_VALIDITY, alg).unwrap();
                let id = Identity::load(&nodes, name).unwrap();
                let (oid, _, _) = public_key(id.cert_der()).unwrap();
                let want = match alg {
                    KeyAlg::Ed25519 => "1.3.101.112",
                    KeyAlg::P256 => "1.2.840.10045.2.1",
                };
                assert_eq!(oid, want, "{name}");
                id
            };
            for (s_alg, c_alg) in [
                (KeyAlg::Ed25519, KeyAlg::P256),
                (KeyAlg::P256, KeyAlg::Ed25519),
                (KeyAlg::Ed25519, KeyAlg::Ed25519),
            ] {
                let server_id = issue(&format!("core-{s_alg}"), Role::Core, s_alg);
                let client_id = issue(&format!("relay-{c_alg}-{s_alg}"), Role::Relay, c_alg);
                let server = local_endpoint(&server_id);
                let client = local_endpoint(&client_id);
                let at = addr(&server);
                let accept = tokio::spawn(async move {
                    let conn = server.accept().await.unwrap().await.unwrap();
                    peer_identity(&conn)
                });
                let conn = client.connect(at, SERVER_NAME).unwrap().await.unwrap();
                assert_eq!(
                    peer_identity(&conn).map(|p| p.0),
                    Some(server_id.name.clone()),
                    "CA {ca_alg}, server {s_alg}, client {c_alg}"
                );
                assert_eq!(
                    accept.await.unwrap().map(|p| p.0),
                    Some(client_id.name.clone())
                );
                conn.close(0u32.into(), b"done");
            }
        }
        assert_eq!("p256".parse::<KeyAlg>(), Ok(KeyAlg::P256));
        assert_eq!(KeyAlg::default().to_string().parse(), Ok(KeyAlg::Ed25519));
        assert!("rsa".parse::<KeyAlg>().is_err());
    }

    #[tokio::test]
    async fn foreign_client_is_refused_by_server() {
        let ours = cluster();
        let theirs = cluster();
        let core = ours.identity("core-1", Role::Core);
        let intruder = Identity {
            roots: core.roots.clone(),
            ..theirs.identity("relay-1", Role::Relay)
        };
        let server = local_endpoint(&core);
        let foreign = local_endpoint(&intruder);
        let server_addr = addr(&server);

        let accept = tokio::spawn(async move { server.accept().await.unwrap().await });

        let client_side = async {
            let conn = foreign.connect(server_addr, SERVER_NAME).unwrap().await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(b"x")
                .await
                .map_err(|_| quinn::ConnectionError::LocallyClosed)?;
            let mut b = [0u8; 1];
            recv.read_exact(&mut b)
                .await
                .map_err(|_| quinn::ConnectionError::LocallyClosed)?;
            Ok::<_, quinn::ConnectionError>(())
        };
        assert!(
            client_side.await.is_err(),
            "foreign client must not get a working connection"
        );
        let refused = accept.await.unwrap().unwrap_err();
        assert!(
            matches!(refused, quinn::ConnectionError::TransportError(_)),
            "server must refuse a client cert from another CA: {refused:?}"
        );
    }

    #[tokio::test]
    async fn our_client_refuses_foreign_server() {
        let ours = cluster();
        let theirs = cluster();
        let foreign_server = local_endpoint(&theirs.identity("core-1", Role::Core));
        let client = local_endpoint(&ours.identity("relay-1", Role::Relay));
        let server_addr = addr(&foreign_server);

        let accept = tokio::spawn(async move { foreign_server.accept().await.unwrap().await });

        let result = client.connect(server_addr, SERVER_NAME).unwrap().await;
        assert!(
            matches!(result, Err(quinn::ConnectionError::TransportError(_))),
            "client must refuse a server cert from another CA: {:?}",
            result.map(|_| ())
        );
        assert!(accept.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn endpoint_binds_address() {
        let c = cluster();
        let id = c.identity("core-1", Role::Core);
        let ep = endpoint(
            (Ipv6Addr::LOCALHOST, 0).into(),
            &id,
            &TransportConfig::default(),
        )
        .or_else(|_| {
            endpoint(
                "127.0.0.1:0".parse().unwrap(),
                &id,
                &TransportConfig::default(),
            )
        })
        .unwrap();
        assert_ne!(addr(&ep).port(), 0);
    }

    #[test]
    fn load_names_missing_file() {
        let c = cluster();
        cert_issue(&c.ca, "core-1", Role::Core, &c.nodes).unwrap();
        let key = c.nodes.join("core-1.key");
        fs::remove_file(&key).unwrap();
        let err = Identity::load(&c.nodes, "core-1").unwrap_err();
        assert!(
            matches!(&err, TlsError::MissingFile(p) if *p == key),
            "{err:?}"
        );
        assert!(err.to_string().contains(&key.display().to_string()));

        let err = Identity::load(&c.nodes, "nobody").unwrap_err();
        let cert = c.nodes.join("nobody.pem");
        assert!(
            err.to_string().contains(&cert.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn load_rejects_cert_from_another_ca() {
        let ours = cluster();
        let theirs = cluster();
        cert_issue(&theirs.ca, "core-1", Role::Core, &ours.nodes).unwrap();
        fs::copy(ours.ca.join(CA_CERT_FILE), ours.nodes.join(CA_CERT_FILE)).unwrap();
        let err = Identity::load(&ours.nodes, "core-1").unwrap_err();
        assert!(matches!(err, TlsError::BadCertificate { .. }), "{err:?}");
    }

    #[test]
    fn load_rejects_mismatched_key() {
        let c = cluster();
        cert_issue(&c.ca, "core-1", Role::Core, &c.nodes).unwrap();
        cert_issue(&c.ca, "core-2", Role::Core, &c.nodes).unwrap();
        fs::copy(c.nodes.join("core-2.key"), c.nodes.join("core-1.key")).unwrap();
        let err = Identity::load(&c.nodes, "core-1").unwrap_err();
        assert!(matches!(err, TlsError::BadCertificate { .. }), "{err:?}");
    }

    #[test]
    fn ca_init_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        ca_init(dir.path()).unwrap();
        let before = fs::read(dir.path().join(CA_KEY_FILE)).unwrap();
        let err = ca_init(dir.path()).unwrap_err();
        assert!(matches!(err, TlsError::AlreadyExists(_)), "{err:?}");
        assert_eq!(fs::read(dir.path().join(CA_KEY_FILE)).unwrap(), before);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join(CA_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn bad_names_are_refused() {
        let c = cluster();
        for bad in ["", "ca", "-x", "a/b", "a.b", "..", &"x".repeat(64)] {
            let err = cert_issue(&c.ca, bad, Role::Core, &c.nodes).unwrap_err();
            assert!(matches!(err, TlsError::BadName(_)), "{bad:?}: {err:?}");
        }
    }
}
