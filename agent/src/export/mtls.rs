//! mTLS for the gRPC flow stream over TCP, on both ends: the agent's
//! listener (`--grpc-addr HOST:PORT`) and the client of `observe` and
//! `status`. In: the TLS flags ([`TlsArgs`]): this process's X.509-SVID and
//! trust bundle from the SPIRE Workload API (`--workload-api`, kept fresh as
//! SPIRE rotates them) or from PEM files (`--tls-cert/--tls-key/--tls-ca`),
//! and the SPIFFE ID globs allowed at the other end (`--allow-peer`). Out:
//! rustls configurations whose certificate and trust anchors are read at
//! every handshake, so a rotation applies to the next connection without a
//! restart. A peer is accepted when its chain verifies against the bundle of
//! the trust domain in its URI SAN and that SPIFFE ID matches an
//! `--allow-peer` glob; otherwise the handshake fails (TLS alert
//! `access_denied` for a disallowed ID, `certificate_required` when no
//! certificate is sent). Private keys stay in memory: the copies made here
//! are wiped after use and never logged; only SPIFFE IDs are.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use clap::Args;
use flowaudit_policy::spiffe::{IdPattern, parse_pattern};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, TrustAnchor, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

use super::linger::{Lingering, Lingers};
use zeroize::Zeroizing;

/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the first SVID may take to arrive from the Workload API.
const WORKLOAD_API_SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// TLS flags of `agent`, `observe` and `status` (TCP gRPC only: a Unix
/// socket is protected by its file permissions and never uses TLS).
#[derive(Debug, Clone, Default, Args)]
pub struct TlsArgs {
    /// mTLS on TCP gRPC with this process's X.509-SVID and trust bundle from
    /// the SPIRE Workload API at this socket (unix:///PATH), kept fresh as
    /// SPIRE rotates them. Needs --allow-peer.
    #[arg(
        long,
        env = "FLOWAUDIT_WORKLOAD_API",
        value_name = "unix:///PATH",
        conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"],
        value_parser = workload_api_endpoint
    )]
    pub workload_api: Option<String>,
    /// mTLS on TCP gRPC with this certificate chain (PEM, leaf first, its URI
    /// SAN a SPIFFE ID); with --tls-key and --tls-ca. Needs --allow-peer.
    #[arg(
        long,
        env = "FLOWAUDIT_TLS_CERT",
        value_name = "FILE",
        requires_all = ["tls_key", "tls_ca"]
    )]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM, PKCS#8, SEC1 or PKCS#1) of --tls-cert.
    #[arg(
        long,
        env = "FLOWAUDIT_TLS_KEY",
        value_name = "FILE",
        requires_all = ["tls_cert", "tls_ca"]
    )]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that the other end's certificate must chain to.
    #[arg(
        long,
        env = "FLOWAUDIT_TLS_CA",
        value_name = "FILE",
        requires_all = ["tls_cert", "tls_key"]
    )]
    pub tls_ca: Option<PathBuf>,
    /// SPIFFE ID allowed at the other end of a TCP gRPC connection (for
    /// `agent` and `relay`: their clients; for `observe` and `status`: the
    /// agent or relay dialed),
    /// repeatable. Globs as in policies: `*` one segment, `**` any rest,
    /// e.g. 'spiffe://demo.local/ns/flowaudit/sa/*'. Required with TLS:
    /// no peer is allowed by default.
    #[arg(
        long,
        env = "FLOWAUDIT_ALLOW_PEER",
        value_name = "GLOB",
        value_delimiter = ','
    )]
    pub allow_peer: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "TLS is configured (--workload-api or --tls-cert) but no --allow-peer: name the SPIFFE IDs allowed at the other end, e.g. --allow-peer 'spiffe://demo.local/ns/flowaudit/sa/*' (none is allowed by default)"
    )]
    NoAllowedPeer,
    #[error("--allow-peer {glob}: {reason}")]
    AllowPeer { glob: String, reason: String },
    #[error(
        "--allow-peer needs TLS: add --workload-api unix:///PATH or --tls-cert F --tls-key F --tls-ca F"
    )]
    AllowPeerWithoutTls,
    #[error("could not read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path}: {reason}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("no X.509-SVID from the SPIRE Workload API at {endpoint}: {source} ({hint})")]
    WorkloadApi {
        endpoint: String,
        source: spiffe::X509SourceError,
        /// What to check: the socket, when it does not exist.
        hint: &'static str,
    },
    #[error("the Workload API's SVID or bundle is unusable: {0}")]
    Svid(String),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The SPIFFE ID globs allowed at the other end (`--allow-peer`).
#[derive(Debug, Clone)]
pub struct AllowedPeers(Vec<IdPattern>);

impl AllowedPeers {
    /// Parses the globs; an empty list is an error, so TLS never means
    /// "any certificate from the CA".
    pub fn parse(globs: &[String]) -> Result<Self, TlsError> {
        if globs.is_empty() {
            return Err(TlsError::NoAllowedPeer);
        }
        globs
            .iter()
            .map(|g| {
                parse_pattern(g).map_err(|reason| TlsError::AllowPeer {
                    glob: g.clone(),
                    reason,
                })
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    pub fn allows(&self, spiffe_id: &str) -> bool {
        self.0.iter().any(|p| p.matches(spiffe_id))
    }
}

/// This process's certificate and the trust anchors, at one moment.
struct Material {
    key: Arc<CertifiedKey>,
    spiffe_id: String,
    /// Anchors by trust domain (from the Workload API's bundles).
    by_domain: HashMap<String, Vec<TrustAnchor<'static>>>,
    /// Anchors for any trust domain (--tls-ca).
    any_domain: Vec<TrustAnchor<'static>>,
}

impl Material {
    fn anchors_for(&self, trust_domain: &str) -> &[TrustAnchor<'static>] {
        self.by_domain
            .get(trust_domain)
            .map_or(&self.any_domain[..], |a| &a[..])
    }

    /// Builds the signing key from PKCS#8 DER; the caller wipes `pkcs8`.
    fn new(
        chain: Vec<CertificateDer<'static>>,
        pkcs8: &[u8],
        by_domain: HashMap<String, Vec<TrustAnchor<'static>>>,
        any_domain: Vec<TrustAnchor<'static>>,
    ) -> Result<Self, String> {
        let leaf = chain.first().ok_or("empty certificate chain")?;
        let spiffe_id = spiffe::cert::spiffe_id_from_der(leaf.as_ref())
            .map_err(|e| format!("the certificate has no SPIFFE ID in its URI SAN: {e}"))?
            .to_string();
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8));
        let signer = rustls::crypto::ring::sign::any_supported_type(&der)
            .map_err(|e| format!("unusable private key: {e}"))?;
        Ok(Self {
            key: Arc::new(CertifiedKey::new(chain, signer)),
            spiffe_id,
            by_domain,
            any_domain,
        })
    }
}

/// Refuses a `--tls-ca` file with a certificate that is not a CA's (a
/// leaf given by mistake): rustls would take it as a trust anchor, and
/// every peer's handshake would then fail with an unknown issuer.
fn not_a_ca(certs: &[CertificateDer<'static>]) -> Result<(), String> {
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    for (i, c) in certs.iter().enumerate() {
        let (_, parsed) = X509Certificate::from_der(c.as_ref())
            .map_err(|e| format!("certificate {} does not parse: {e}", i + 1))?;
        if !parsed.is_ca() {
            return Err(format!(
                "certificate {} ({}) is not a CA certificate (no basic constraints CA:TRUE): \
                 give the CA that issued the peers' certificates (the trust bundle), not a peer's own certificate",
                i + 1,
                parsed.subject()
            ));
        }
    }
    Ok(())
}

fn anchors(
    certs: impl IntoIterator<Item = CertificateDer<'static>>,
) -> Result<Vec<TrustAnchor<'static>>, String> {
    let mut store = rustls::RootCertStore::empty();
    for c in certs {
        store
            .add(c)
            .map_err(|e| format!("not a usable CA certificate: {e}"))?;
    }
    Ok(store.roots)
}

/// This process's TLS identity: fixed (files) or following the Workload API.
pub struct Identity {
    current: RwLock<Arc<Material>>,
    /// Keeps the Workload API watch alive.
    _source: Option<Arc<spiffe::X509Source>>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("spiffe_id", &self.current().spiffe_id)
            .finish_non_exhaustive()
    }
}

impl Identity {
    fn current(&self) -> Arc<Material> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The SPIFFE ID of the certificate presented now.
    pub fn spiffe_id(&self) -> String {
        self.current().spiffe_id.clone()
    }

    /// From the flags: `None` without TLS flags.
    pub async fn load(args: &TlsArgs) -> Result<Option<Arc<Self>>, TlsError> {
        if let Some(endpoint) = &args.workload_api {
            return Self::from_workload_api(endpoint).await.map(Some);
        }
        match (&args.tls_cert, &args.tls_key, &args.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Self::from_files(cert, key, ca).map(Some),
            _ => Ok(None),
        }
    }

    fn from_files(cert: &Path, key: &Path, ca: &Path) -> Result<Arc<Self>, TlsError> {
        let read = |what, path: &Path| {
            std::fs::read(path)
                .map(Zeroizing::new)
                .map_err(|source| TlsError::Read {
                    what,
                    path: path.to_path_buf(),
                    source,
                })
        };
        let pem_err = |what, path: &Path, reason: String| TlsError::Pem {
            what,
            path: path.to_path_buf(),
            reason,
        };
        let certs = |what, path: &Path| -> Result<Vec<CertificateDer<'static>>, TlsError> {
            let text = read(what, path)?;
            let certs = CertificateDer::pem_slice_iter(&text)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem_err(what, path, e.to_string()))?;
            if certs.is_empty() {
                return Err(pem_err(what, path, "no CERTIFICATE in it".into()));
            }
            Ok(certs)
        };
        let chain = certs("--tls-cert", cert)?;
        let ca_certs = certs("--tls-ca", ca)?;
        not_a_ca(&ca_certs).map_err(|e| pem_err("--tls-ca", ca, e))?;
        let roots = anchors(ca_certs).map_err(|e| pem_err("--tls-ca", ca, e))?;
        let key_pem = read("--tls-key", key)?;
        let mut key_der = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| pem_err("--tls-key", key, format!("no private key: {e}")))?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key_der);
        zeroize::Zeroize::zeroize(&mut key_der);
        let signer =
            signer.map_err(|e| pem_err("--tls-key", key, format!("unusable private key: {e}")))?;
        let leaf = chain.first().expect("checked non-empty");
        let spiffe_id = spiffe::cert::spiffe_id_from_der(leaf.as_ref())
            .map_err(|e| {
                pem_err(
                    "--tls-cert",
                    cert,
                    format!("the certificate has no SPIFFE ID in its URI SAN: {e}"),
                )
            })?
            .to_string();
        let certified = CertifiedKey::new(chain, signer);
        // A key of another certificate would fail every handshake, on
        // both sides, long after the start.
        match certified.keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(_) => {
                return Err(pem_err(
                    "--tls-key",
                    key,
                    format!(
                        "this private key is not the key of the certificate in {} (--tls-cert): give the key made with that certificate",
                        cert.display()
                    ),
                ));
            }
        }
        let material = Material {
            key: Arc::new(certified),
            spiffe_id,
            by_domain: HashMap::new(),
            any_domain: roots,
        };
        Ok(Arc::new(Self {
            current: RwLock::new(Arc::new(material)),
            _source: None,
        }))
    }

    async fn from_workload_api(endpoint: &str) -> Result<Arc<Self>, TlsError> {
        let socket_missing = || workload_api_socket_missing(endpoint);
        // Said before the wait, which can be long.
        match socket_missing() {
            true => tracing::warn!(
                endpoint,
                wait_s = WORKLOAD_API_SYNC_TIMEOUT.as_secs(),
                "the SPIRE Workload API socket does not exist (yet): waiting for it and for an X.509-SVID"
            ),
            false => tracing::info!(
                endpoint,
                wait_s = WORKLOAD_API_SYNC_TIMEOUT.as_secs(),
                "asking the SPIRE Workload API for an X.509-SVID"
            ),
        }
        let source = spiffe::X509Source::builder()
            .endpoint(endpoint)
            .initial_sync_timeout(WORKLOAD_API_SYNC_TIMEOUT)
            .build()
            .await
            .map_err(|source| TlsError::WorkloadApi {
                endpoint: endpoint.to_owned(),
                source,
                hint: match socket_missing() {
                    true => "the socket does not exist: is the SPIRE agent running, and its socket's directory mounted here?",
                    false => "is the SPIRE agent running, and registered an entry for this workload?",
                },
            })?;
        let source = Arc::new(source);
        let material = material_of(&source)?;
        tracing::info!(spiffe_id = %material.spiffe_id, endpoint, "X.509-SVID from the SPIRE Workload API");
        let identity = Arc::new(Self {
            current: RwLock::new(Arc::new(material)),
            _source: Some(source.clone()),
        });
        let weak = Arc::downgrade(&identity);
        let mut updates = source.updated();
        tokio::spawn(async move {
            while updates.changed().await.is_ok() {
                let Some(identity) = weak.upgrade() else {
                    break;
                };
                match material_of(&source) {
                    Ok(m) => {
                        tracing::info!(spiffe_id = %m.spiffe_id, "X.509-SVID or bundle rotated by the Workload API: new TLS handshakes use it");
                        *identity.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(m);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the Workload API sent an unusable update: keeping the previous SVID")
                    }
                }
            }
        });
        Ok(identity)
    }
}

/// The selected SVID and every bundle of the source, as rustls material.
fn material_of(source: &spiffe::X509Source) -> Result<Material, TlsError> {
    let err = |e: &dyn std::fmt::Display| TlsError::Svid(e.to_string());
    let svid = source.svid().map_err(|e| err(&e))?;
    let bundles = source.bundle_set().map_err(|e| err(&e))?;
    let chain = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let mut by_domain = HashMap::new();
    for (td, bundle) in bundles.iter() {
        let certs = bundle
            .authorities()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()));
        by_domain.insert(td.to_string(), anchors(certs).map_err(|e| err(&e))?);
    }
    // The source's key is zeroized on drop; this borrow makes no copy.
    Material::new(chain, svid.private_key().as_bytes(), by_domain, Vec::new()).map_err(|e| err(&e))
}

/// Checks the other end's chain and SPIFFE ID; presents our certificate.
#[derive(Debug)]
struct Peer {
    identity: Arc<Identity>,
    allowed: AllowedPeers,
    provider: Arc<CryptoProvider>,
}

fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as W;
    let c = match e {
        W::UnknownIssuer => CertificateError::UnknownIssuer,
        W::CertExpired { .. } => CertificateError::Expired,
        W::CertNotValidYet { .. } => CertificateError::NotValidYet,
        W::CertNotValidForName(_) | W::RequiredEkuNotFoundContext(_) => {
            CertificateError::InvalidPurpose
        }
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(c)
}

impl Peer {
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), rustls::Error> {
        let denied =
            rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure);
        let Ok(id) = spiffe::cert::spiffe_id_from_der(end_entity.as_ref()) else {
            tracing::warn!("TLS peer refused: its certificate has no SPIFFE ID");
            return Err(denied);
        };
        let material = self.identity.current();
        let anchors = material.anchors_for(id.trust_domain().as_str());
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| {
            tracing::warn!(peer = %id, error = %e, "TLS peer refused: its certificate does not verify against the trust bundle");
            pki_error(e)
        })?;
        if !self.allowed.allows(&id.to_string()) {
            tracing::warn!(peer = %id, "TLS peer refused: its SPIFFE ID matches no --allow-peer");
            return Err(denied);
        }
        tracing::debug!(peer = %id, "TLS peer accepted");
        Ok(())
    }
}

/// The handshake-signature checks, the same on both sides: rustls's own,
/// with the provider's algorithms.
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            let algs = &self.provider.signature_verification_algorithms;
            rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            let algs = &self.provider.signature_verification_algorithms;
            rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

impl ClientCertVerifier for Peer {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )
        .map(|()| ClientCertVerified::assertion())
    }

    signature_checks!();
}

impl ServerCertVerifier for Peer {
    /// The server name is not checked: SVIDs name a SPIFFE ID, not a host.
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )
        .map(|()| ServerCertVerified::assertion())
    }

    signature_checks!();
}

/// Presents the identity's certificate of the moment.
#[derive(Debug)]
struct Presenter(Arc<Identity>);

impl rustls::server::ResolvesServerCert for Presenter {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().key.clone())
    }
}

impl rustls::client::ResolvesClientCert for Presenter {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn peer(identity: &Arc<Identity>, allowed: AllowedPeers) -> (Arc<Peer>, Arc<CryptoProvider>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let peer = Arc::new(Peer {
        identity: identity.clone(),
        allowed,
        provider: provider.clone(),
    });
    (peer, provider)
}

/// The agent's side: a TLS acceptor for its TCP gRPC listeners.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
    identity: Arc<Identity>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// From the flags: `None` without TLS flags (then --allow-peer is an error).
    pub async fn load(args: &TlsArgs) -> Result<Option<Self>, TlsError> {
        let Some((identity, allowed)) = load_with_peers(args).await? else {
            return Ok(None);
        };
        let (peer, provider) = peer(&identity, allowed);
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(peer)
            .with_cert_resolver(Arc::new(Presenter(identity.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Some(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            identity,
        }))
    }

    pub fn spiffe_id(&self) -> String {
        self.identity.spiffe_id()
    }

    /// Accepts TCP connections and completes their handshakes concurrently
    /// (a slow or hostile client holds up no one else); yields only the
    /// connections whose peer was authorized. Each lingers in `lingers`
    /// when it ends (see [`super::linger`]).
    pub fn incoming(
        &self,
        listener: TcpListener,
        lingers: &Lingers,
    ) -> tokio_stream::wrappers::ReceiverStream<
        Result<TlsStream<Lingering<TcpStream>>, std::io::Error>,
    > {
        let lingers = lingers.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let acceptor = self.acceptor.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, from) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a TCP gRPC connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let tcp = Lingering::new(tcp, &lingers);
                let acceptor = acceptor.clone();
                let out = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = out.send(Ok(tls)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::info!(%from, error = %e, "TLS handshake on the gRPC listener failed: connection closed");
                        }
                        Err(_) => {
                            tracing::info!(%from, "TLS handshake on the gRPC listener timed out: connection closed");
                        }
                    }
                });
                if tx.is_closed() {
                    break;
                }
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

impl TlsArgs {
    /// The flags on their own, with nothing read or asked: the globs, and
    /// TLS and --allow-peer only together. The agent checks them before it
    /// attaches anything; loading checks them again.
    pub fn check(&self) -> Result<Option<AllowedPeers>, TlsError> {
        let allowed = match self.allow_peer.is_empty() {
            true => None,
            false => Some(AllowedPeers::parse(&self.allow_peer)?),
        };
        let tls = self.workload_api.is_some() || self.tls_cert.is_some();
        match (tls, &allowed) {
            (false, Some(_)) => Err(TlsError::AllowPeerWithoutTls),
            (true, None) => Err(TlsError::NoAllowedPeer),
            _ => Ok(allowed),
        }
    }
}

/// `--workload-api`: a Unix socket as a URI (`unix:///PATH`), or
/// `tcp://IP:PORT`, as the SPIFFE Workload Endpoint specification has it.
/// A bare path was refused only after the 30 s wait, as "not a valid URI".
fn workload_api_endpoint(s: &str) -> Result<String, String> {
    match s.strip_prefix("unix://") {
        Some(path) if path.starts_with('/') && path.len() > 1 => Ok(s.to_owned()),
        Some(_) => Err(format!(
            "`{s}`: a socket's path must be absolute, as in unix:///run/spire/sockets/agent.sock (three slashes)"
        )),
        None if s.starts_with("tcp://") => Ok(s.to_owned()),
        None if s.starts_with('/') => Err(format!(
            "`{s}`: the Workload API is given as a URI: unix://{s}"
        )),
        None => Err(format!(
            "`{s}`: expected unix:///PATH (the SPIRE agent's Workload API socket) or tcp://IP:PORT"
        )),
    }
}

/// Whether `endpoint` names a Unix socket that does not exist (now).
fn workload_api_socket_missing(endpoint: &str) -> bool {
    endpoint
        .strip_prefix("unix://")
        .is_some_and(|p| !Path::new(p).exists())
}

impl TlsArgs {
    /// For a command (`observe`, `status`), which does not wait for a
    /// SPIRE agent as the agent and the relay do: a `--workload-api`
    /// socket that does not exist is an error at once (it was one after
    /// the Workload API's 30 s wait).
    pub fn check_socket_now(&self) -> Result<(), String> {
        match &self.workload_api {
            Some(endpoint) if workload_api_socket_missing(endpoint) => Err(format!(
                "--workload-api {endpoint}: the socket does not exist: is the SPIRE agent running on this machine, and is that its socket_path?"
            )),
            _ => Ok(()),
        }
    }

    /// Reads and checks `--tls-cert`, `--tls-key` and `--tls-ca` (nothing
    /// without them), so that a wrong file stops the agent at once.
    pub fn check_files(&self) -> Result<(), TlsError> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Identity::from_files(cert, key, ca).map(drop),
            _ => Ok(()),
        }
    }
}

/// The identity and allowed peers, or `None` without TLS flags.
async fn load_with_peers(
    args: &TlsArgs,
) -> Result<Option<(Arc<Identity>, AllowedPeers)>, TlsError> {
    // Check the flags before asking SPIRE for anything.
    let allowed = args.check()?;
    let identity = Identity::load(args).await?;
    match (identity, allowed) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(TlsError::AllowPeerWithoutTls),
        (Some(_), None) => Err(TlsError::NoAllowedPeer),
        (Some(i), Some(a)) => Ok(Some((i, a))),
    }
}

/// The client's side (`observe`, `status`): TLS for a TCP `--server`.
#[derive(Clone, Default)]
pub struct ClientTls(Option<(tokio_rustls::TlsConnector, Arc<Identity>)>);

impl ClientTls {
    pub async fn load(args: &TlsArgs) -> Result<Self, TlsError> {
        let Some((identity, allowed)) = load_with_peers(args).await? else {
            return Ok(Self(None));
        };
        let (peer, provider) = peer(&identity, allowed);
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(peer)
            .with_client_cert_resolver(Arc::new(Presenter(identity.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self(Some((
            tokio_rustls::TlsConnector::from(Arc::new(config)),
            identity,
        ))))
    }

    pub fn is_enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Dials `hostport` over TCP and completes the handshake.
    pub async fn dial(
        &self,
        hostport: &str,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, std::io::Error> {
        let Some((connector, _)) = &self.0 else {
            return Err(std::io::Error::other("TLS is not configured"));
        };
        let tcp = TcpStream::connect(hostport).await?;
        // Verification ignores the name; rustls needs one for SNI.
        let host = hostport
            .rsplit_once(':')
            .map_or(hostport, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned())
            .unwrap_or_else(|_| ServerName::try_from("flowaudit").expect("a valid DNS name"));
        tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
            })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn globs(g: &[&str]) -> Vec<String> {
        g.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn peers_are_authorized_by_spiffe_id_glob() {
        let allowed = AllowedPeers::parse(&globs(&[
            "spiffe://demo.local/ns/flowaudit/sa/*",
            "spiffe://demo.local/ops/**",
        ]))
        .unwrap();
        let cases = [
            ("spiffe://demo.local/ns/flowaudit/sa/relay", true),
            ("spiffe://demo.local/ns/flowaudit/sa/relay/extra", false),
            ("spiffe://demo.local/ns/99-apps/sa/frontend", false),
            ("spiffe://other.local/ns/flowaudit/sa/relay", false),
            ("spiffe://demo.local/ops/alice", true),
            ("spiffe://demo.local/ops/team/bob", true),
            ("spiffe://demo.local/ops", false),
            ("", false),
            ("not-a-spiffe-id", false),
        ];
        for (id, want) in cases {
            assert_eq!(allowed.allows(id), want, "{id}");
        }
    }

    #[test]
    fn no_allowed_peer_and_bad_globs_are_errors() {
        assert!(matches!(
            AllowedPeers::parse(&[]),
            Err(TlsError::NoAllowedPeer)
        ));
        let e = AllowedPeers::parse(&globs(&["demo.local/x"])).unwrap_err();
        assert!(e.to_string().contains("--allow-peer demo.local/x"), "{e}");
    }

    #[tokio::test]
    async fn allow_peer_without_tls_and_tls_without_allow_peer_are_refused() {
        let only_peers = TlsArgs {
            allow_peer: globs(&["spiffe://demo.local/x"]),
            ..Default::default()
        };
        assert!(matches!(
            ServerTls::load(&only_peers).await,
            Err(TlsError::AllowPeerWithoutTls)
        ));
        assert!(
            ServerTls::load(&TlsArgs::default())
                .await
                .unwrap()
                .is_none()
        );
    }

    /// A key that is not the certificate's is refused at start, naming
    /// both files (every handshake failed later, on both sides).
    #[tokio::test]
    async fn a_key_of_another_certificate_is_refused_at_start() {
        let dir = flowaudit_tests::support::TestDir::new("fa-mtls-keys");
        let m = flowaudit_tests::tls::TlsMaterial::generate(
            dir.path(),
            &[
                ("relay", "spiffe://demo.local/ns/flowaudit/sa/relay"),
                ("agent", "spiffe://demo.local/ns/flowaudit/sa/agent"),
            ],
        )
        .expect("openssl makes the test PKI (cargo xtask setup installs it)");
        let args = |key: &str| TlsArgs {
            tls_cert: Some(m.cert("relay").into()),
            tls_key: Some(key.into()),
            tls_ca: Some(m.ca().into()),
            allow_peer: globs(&["spiffe://demo.local/ns/flowaudit/sa/*"]),
            ..Default::default()
        };
        assert!(
            ServerTls::load(&args(&m.key("relay")))
                .await
                .unwrap()
                .is_some()
        );
        let e = ServerTls::load(&args(&m.key("agent")))
            .await
            .unwrap_err()
            .to_string();
        // A peer's own certificate given as the CA.
        let leaf_as_ca = ServerTls::load(&TlsArgs {
            tls_ca: Some(m.cert("agent").into()),
            ..args(&m.key("relay"))
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(
            leaf_as_ca.contains(&m.cert("agent"))
                && leaf_as_ca.contains("--tls-ca")
                && leaf_as_ca.contains("certificate 1 (")
                && leaf_as_ca.contains("is not a CA certificate"),
            "{leaf_as_ca}"
        );
        assert!(
            e.contains(&m.key("agent"))
                && e.contains(&format!(
                    "this private key is not the key of the certificate in {} (--tls-cert)",
                    m.cert("relay")
                )),
            "{e}"
        );
    }
}
