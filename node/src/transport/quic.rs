//! `Transport` over QUIC (quinn) with mutual TLS: every node presents a certificate signed by
//! the cluster CA and accepts only peers that do.
//!
//! Each request is one bidirectional stream: a length-prefixed bincode frame (at most
//! `FRAME_BYTES_MAX`), then for blob transfers the raw bytes. Connections are cached per
//! peer and re-dialled on failure; every request has a deadline.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use engine::Digest;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::sync::Mutex;

use super::{
    BlobBytes, BlobReader, PeerHandler, PeerRequest, PeerResponse, Transport, TransportError,
    FRAME_BYTES_MAX,
};
use crate::cluster::certs::{node_paths, CLUSTER_SERVER_NAME};
use crate::raft::{NodeId, NodeInfo};

const ALPN: &[u8] = b"portolan/1";
/// Deadline of one request/response exchange (blob transfers get `BLOB_TIMEOUT`).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of establishing a connection (a dead peer fails fast; Raft retries).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline of a whole blob transfer.
const BLOB_TIMEOUT: Duration = Duration::from_secs(3600);
/// Concurrent streams a peer may open on one connection; more wait for credit.
const STREAMS_PER_CONNECTION_MAX: u32 = 256;
/// A connection silent this long is closed, failing every stream on it: this is how a
/// request in flight to a peer that died fails fast (keep-alives go at a fifth of it).
const IDLE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum QuicSetupError {
    #[error("read {path}: {reason}")]
    Pem { path: String, reason: String },
    #[error("tls config: {0}")]
    Tls(#[from] rustls::Error),
    #[error("tls verifier: {0}")]
    Verifier(String),
    #[error("quic config: {0}")]
    Quic(String),
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

fn pem_err(path: &Path, e: impl std::fmt::Display) -> QuicSetupError {
    QuicSetupError::Pem {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// TLS material of one node: its region's CA, the CAs of the other regions it replicates
/// with, and the node's certificate and key.
pub struct NodeTls {
    ca: Vec<CertificateDer<'static>>,
    /// Other regions by name, with their CA certificates.
    remote: Vec<(String, Vec<CertificateDer<'static>>)>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn read_certs(p: &Path) -> Result<Vec<CertificateDer<'static>>, QuicSetupError> {
    CertificateDer::pem_file_iter(p)
        .map_err(|e| pem_err(p, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(p, e))
}

/// Who is on the other end of a connection, by the CA that signed its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerKind {
    /// A node of this region: every request is served.
    Region,
    /// A node of the named other region: only cross-region requests are served.
    Remote(String),
}

type Verifier = Arc<dyn rustls::server::danger::ClientCertVerifier>;

impl NodeTls {
    /// Loads `certs_dir` (this region) and the CA file of each other region in `remote`.
    pub fn load(
        certs_dir: &Path,
        node_id: NodeId,
        remote: &[(String, std::path::PathBuf)],
    ) -> Result<NodeTls, QuicSetupError> {
        let ca_path = certs_dir.join("ca.pem");
        let (cert_path, key_path) = node_paths(certs_dir, node_id);
        let remote = remote
            .iter()
            .map(|(name, path)| Ok((name.clone(), read_certs(path)?)))
            .collect::<Result<Vec<_>, QuicSetupError>>()?;
        Ok(NodeTls {
            ca: read_certs(&ca_path)?,
            remote,
            chain: read_certs(&cert_path)?,
            key: PrivateKeyDer::from_pem_file(&key_path).map_err(|e| pem_err(&key_path, e))?,
        })
    }

    fn store(
        cas: &[CertificateDer<'static>],
    ) -> Result<Arc<rustls::RootCertStore>, QuicSetupError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in cas {
            roots.add(c.clone())?;
        }
        Ok(Arc::new(roots))
    }

    /// Every CA this node trusts: its region's and the other regions'.
    fn all_cas(&self) -> Vec<CertificateDer<'static>> {
        self.ca
            .iter()
            .chain(self.remote.iter().flat_map(|(_, c)| c.iter()))
            .cloned()
            .collect()
    }

    fn verifier(cas: &[CertificateDer<'static>]) -> Result<Verifier, QuicSetupError> {
        rustls::server::WebPkiClientVerifier::builder_with_provider(
            Self::store(cas)?,
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| QuicSetupError::Verifier(e.to_string()))
    }

    /// Classifies peers by the CA that signed them (this region's first).
    fn classifier(&self) -> Result<Classifier, QuicSetupError> {
        let mut by_ca = vec![(PeerKind::Region, Self::verifier(&self.ca)?)];
        for (name, cas) in &self.remote {
            by_ca.push((PeerKind::Remote(name.clone()), Self::verifier(cas)?));
        }
        Ok(Classifier { by_ca })
    }

    fn server_config(&self) -> Result<quinn::ServerConfig, QuicSetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Self::verifier(&self.all_cas())?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto =
            QuicServerConfig::try_from(tls).map_err(|e| QuicSetupError::Quic(e.to_string()))?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        cfg.transport_config(transport_config());
        Ok(cfg)
    }

    fn client_config(&self) -> Result<quinn::ClientConfig, QuicSetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(Self::store(&self.all_cas())?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto =
            QuicClientConfig::try_from(tls).map_err(|e| QuicSetupError::Quic(e.to_string()))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        cfg.transport_config(transport_config());
        Ok(cfg)
    }
}

/// Tells a region's own nodes from other regions' by re-verifying the peer's chain against
/// each CA alone (the handshake accepted any trusted CA).
struct Classifier {
    by_ca: Vec<(PeerKind, Verifier)>,
}

impl Classifier {
    fn classify(&self, conn: &quinn::Connection) -> Option<PeerKind> {
        let chain = conn
            .peer_identity()?
            .downcast::<Vec<CertificateDer<'static>>>()
            .ok()?;
        let (leaf, rest) = chain.split_first()?;
        let now = rustls::pki_types::UnixTime::now();
        self.by_ca
            .iter()
            .find(|(_, v)| v.verify_client_cert(leaf, rest, now).is_ok())
            .map(|(kind, _)| kind.clone())
    }
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(STREAMS_PER_CONNECTION_MAX.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.max_idle_timeout(Some(
        IDLE_TIMEOUT
            .try_into()
            .expect("idle timeout fits a QUIC varint"),
    ));
    t.keep_alive_interval(Some(IDLE_TIMEOUT / 5));
    Arc::new(t)
}

/// One node's QUIC endpoint: serves peers and dials them.
pub struct QuicTransport {
    endpoint: quinn::Endpoint,
    conns: Mutex<HashMap<SocketAddr, quinn::Connection>>,
}

async fn write_frame<T: Serialize>(s: &mut quinn::SendStream, v: &T) -> std::io::Result<()> {
    let body = bincode::serialize(v).map_err(std::io::Error::other)?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|l| *l <= FRAME_BYTES_MAX)
        .ok_or_else(|| std::io::Error::other("frame over FRAME_BYTES_MAX"))?;
    s.write_all(&len.to_be_bytes()).await?;
    s.write_all(&body).await?;
    Ok(())
}

async fn read_frame<T: DeserializeOwned>(s: &mut quinn::RecvStream) -> std::io::Result<T> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)
        .await
        .map_err(std::io::Error::other)?;
    let len = u32::from_be_bytes(len);
    if len > FRAME_BYTES_MAX {
        return Err(std::io::Error::other(format!(
            "frame of {len} bytes is over FRAME_BYTES_MAX"
        )));
    }
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body)
        .await
        .map_err(std::io::Error::other)?;
    bincode::deserialize(&body).map_err(std::io::Error::other)
}

impl QuicTransport {
    /// Binds the endpoint and serves peers with `handler` until the endpoint closes.
    pub fn start<H: PeerHandler>(
        listen: SocketAddr,
        tls: &NodeTls,
        handler: Arc<H>,
    ) -> Result<Arc<QuicTransport>, QuicSetupError> {
        let mut endpoint =
            quinn::Endpoint::server(tls.server_config()?, listen).map_err(|source| {
                QuicSetupError::Bind {
                    addr: listen,
                    source,
                }
            })?;
        endpoint.set_default_client_config(tls.client_config()?);
        let t = Arc::new(QuicTransport {
            endpoint: endpoint.clone(),
            conns: Mutex::new(HashMap::new()),
        });
        tokio::spawn(accept_loop(endpoint, handler, Arc::new(tls.classifier()?)));
        Ok(t)
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutdown");
    }

    async fn connection(
        &self,
        target: NodeId,
        addr: &NodeInfo,
    ) -> Result<quinn::Connection, TransportError> {
        let sa: SocketAddr = addr.quic.parse().map_err(|_| {
            TransportError::Unreachable(target, format!("bad quic address {:?}", addr.quic))
        })?;
        {
            let mut conns = self.conns.lock().await;
            if let Some(c) = conns.get(&sa) {
                if c.close_reason().is_none() {
                    return Ok(c.clone());
                }
                conns.remove(&sa);
            }
        }
        // Dial without holding the map: a dead peer must not stall calls to live ones. Two
        // racing dials to one peer both succeed; the later one replaces the earlier in the map.
        let connecting = self
            .endpoint
            .connect(sa, CLUSTER_SERVER_NAME)
            .map_err(|e| TransportError::Unreachable(target, e.to_string()))?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| TransportError::Timeout(target))?
            .map_err(|e| TransportError::Unreachable(target, e.to_string()))?;
        self.conns.lock().await.insert(sa, conn.clone());
        Ok(conn)
    }

    async fn open(
        &self,
        target: NodeId,
        addr: &NodeInfo,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), TransportError> {
        let conn = self.connection(target, addr).await?;
        conn.open_bi()
            .await
            .map_err(|e| TransportError::Unreachable(target, e.to_string()))
    }
}

fn proto(peer: NodeId, e: impl std::fmt::Display) -> TransportError {
    TransportError::Protocol {
        peer,
        reason: e.to_string(),
    }
}

impl Transport for QuicTransport {
    async fn call(
        &self,
        target: NodeId,
        addr: &NodeInfo,
        req: PeerRequest,
    ) -> Result<PeerResponse, TransportError> {
        let fut = async {
            let (mut send, mut recv) = self.open(target, addr).await?;
            write_frame(&mut send, &req)
                .await
                .map_err(|e| proto(target, e))?;
            send.finish().map_err(|e| proto(target, e))?;
            read_frame(&mut recv).await.map_err(|e| proto(target, e))
        };
        tokio::time::timeout(CALL_TIMEOUT, fut)
            .await
            .map_err(|_| TransportError::Timeout(target))?
    }

    async fn put_blob(
        &self,
        target: NodeId,
        addr: &NodeInfo,
        digest: &Digest,
        bytes: BlobBytes,
    ) -> Result<(), TransportError> {
        let fut = async {
            let (mut send, mut recv) = self.open(target, addr).await?;
            let req = PeerRequest::BlobPut {
                digest: digest.clone(),
                size_bytes: bytes.len() as u64,
            };
            write_frame(&mut send, &req)
                .await
                .map_err(|e| proto(target, e))?;
            // A peer that already holds the blob, or refuses it, answers without reading the
            // bytes and stops the stream: its answer, not the interrupted write, decides.
            let wrote = send.write_all(&bytes).await;
            let _ = send.finish();
            let answer = read_frame(&mut recv).await.map_err(|e| match &wrote {
                Err(w) => proto(target, format!("{w}; no answer: {e}")),
                Ok(()) => proto(target, e),
            })?;
            match answer {
                PeerResponse::BlobStored => Ok(()),
                PeerResponse::Refused(reason) => Err(TransportError::Refused {
                    peer: target,
                    reason,
                }),
                other => Err(proto(target, format!("unexpected answer {other:?}"))),
            }
        };
        tokio::time::timeout(BLOB_TIMEOUT, fut)
            .await
            .map_err(|_| TransportError::Timeout(target))?
    }

    async fn get_blob(
        &self,
        target: NodeId,
        addr: &NodeInfo,
        digest: &Digest,
    ) -> Result<Option<(u64, BlobReader)>, TransportError> {
        let fut = async {
            let (mut send, mut recv) = self.open(target, addr).await?;
            write_frame(
                &mut send,
                &PeerRequest::BlobGet {
                    digest: digest.clone(),
                },
            )
            .await
            .map_err(|e| proto(target, e))?;
            send.finish().map_err(|e| proto(target, e))?;
            match read_frame(&mut recv).await.map_err(|e| proto(target, e))? {
                PeerResponse::BlobFound { size_bytes } => {
                    let reader: BlobReader = Box::new(recv.take(size_bytes));
                    Ok(Some((size_bytes, reader)))
                }
                PeerResponse::BlobMissing => Ok(None),
                other => Err(proto(target, format!("unexpected answer {other:?}"))),
            }
        };
        tokio::time::timeout(CALL_TIMEOUT, fut)
            .await
            .map_err(|_| TransportError::Timeout(target))?
    }
}

async fn accept_loop<H: PeerHandler>(
    endpoint: quinn::Endpoint,
    handler: Arc<H>,
    classifier: Arc<Classifier>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let handler = handler.clone();
        let classifier = classifier.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    // Includes peers whose certificate the cluster CA did not sign.
                    tracing::warn!(error = %e, "refused a peer connection");
                    return;
                }
            };
            let Some(kind) = classifier.classify(&conn) else {
                conn.close(1u32.into(), b"unclassified peer");
                return;
            };
            loop {
                let (send, recv) = match conn.accept_bi().await {
                    Ok(s) => s,
                    Err(_) => return,
                };
                let handler = handler.clone();
                tokio::spawn(serve_stream(handler, kind.clone(), send, recv));
            }
        });
    }
}

async fn serve_stream<H: PeerHandler>(
    handler: Arc<H>,
    kind: PeerKind,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let req: PeerRequest = match tokio::time::timeout(CALL_TIMEOUT, read_frame(&mut recv)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "malformed peer request");
            return;
        }
        Err(_) => return,
    };
    let resp = match (req, kind) {
        (PeerRequest::Geo(req), PeerKind::Remote(region)) => {
            PeerResponse::Geo(handler.handle_geo(&region, req).await)
        }
        (_, PeerKind::Remote(region)) => PeerResponse::Refused(format!(
            "region {region} may send only cross-region requests"
        )),
        (PeerRequest::Geo(_), PeerKind::Region) => {
            PeerResponse::Refused("cross-region request from a node of this region".into())
        }
        (PeerRequest::BlobPut { digest, size_bytes }, _) => {
            let body: BlobReader = Box::new(recv.take(size_bytes));
            handler.store_blob(digest, size_bytes, body).await
        }
        (PeerRequest::BlobGet { digest }, _) => match handler.read_blob(&digest).await {
            Some(bytes) => {
                let header = PeerResponse::BlobFound {
                    size_bytes: bytes.len() as u64,
                };
                if write_frame(&mut send, &header).await.is_ok() {
                    let _ = send.write_all(&bytes).await;
                    let _ = send.finish();
                }
                return;
            }
            None => PeerResponse::BlobMissing,
        },
        (other, _) => handler.handle(other).await,
    };
    if write_frame(&mut send, &resp).await.is_ok() {
        let _ = send.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::certs;
    use crate::transport::{GeoRequest, GeoResponse};

    /// Answers every request, recording the region cross-region ones claim to come from.
    #[derive(Default)]
    struct Recorder {
        geo_from: std::sync::Mutex<Vec<String>>,
    }

    impl PeerHandler for Recorder {
        async fn handle(&self, _req: PeerRequest) -> PeerResponse {
            PeerResponse::MembershipChanged
        }

        async fn store_blob(&self, _d: Digest, _n: u64, _b: BlobReader) -> PeerResponse {
            PeerResponse::BlobStored
        }

        async fn read_blob(&self, _d: &Digest) -> Option<BlobBytes> {
            None
        }

        async fn handle_geo(&self, from: &str, _req: GeoRequest) -> GeoResponse {
            self.geo_from.lock().unwrap().push(from.to_string());
            GeoResponse::Pong
        }
    }

    fn start(
        dir: &Path,
        id: NodeId,
        remote: &[(String, std::path::PathBuf)],
    ) -> (Arc<QuicTransport>, Arc<Recorder>, NodeInfo) {
        let tls = NodeTls::load(dir, id, remote).unwrap();
        let rec = Arc::new(Recorder::default());
        let t = QuicTransport::start("127.0.0.1:0".parse().unwrap(), &tls, rec.clone()).unwrap();
        let info = NodeInfo {
            http: String::new(),
            quic: t.local_addr().unwrap().to_string(),
        };
        (t, rec, info)
    }

    /// A node serves its own region everything and another region only cross-region
    /// requests, tells them apart by the CA that signed the peer (not by what the peer says),
    /// and does not talk to a region it was not configured to trust.
    #[tokio::test]
    async fn peers_are_classified_by_the_ca_that_signed_them() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            tmp.path().join("a"),
            tmp.path().join("b"),
            tmp.path().join("c"),
        );
        certs::init(&a, "east", &[1, 2]).unwrap();
        certs::init(&b, "west", &[1]).unwrap();
        certs::init(&c, "rogue", &[1]).unwrap();
        let (_a1, a1_rec, a1) = start(&a, 1, &[("west".into(), b.join("ca.pem"))]);
        let (a2, _, _) = start(&a, 2, &[("west".into(), b.join("ca.pem"))]);
        let (b1, _, _) = start(&b, 1, &[("east".into(), a.join("ca.pem"))]);
        let (c1, _, _) = start(&c, 1, &[("east".into(), a.join("ca.pem"))]);

        // Same region: served.
        let r = a2
            .call(1, &a1, PeerRequest::RemoveMember { node_id: 9 })
            .await;
        assert!(matches!(r, Ok(PeerResponse::MembershipChanged)), "{r:?}");
        // Same region, cross-region request: refused.
        let r = a2.call(1, &a1, PeerRequest::Geo(GeoRequest::Ping)).await;
        assert!(matches!(r, Ok(PeerResponse::Refused(_))), "{r:?}");
        // Another region: cross-region requests only, attributed to the region of its CA.
        let r = b1.call(1, &a1, PeerRequest::Geo(GeoRequest::Ping)).await;
        assert!(
            matches!(r, Ok(PeerResponse::Geo(GeoResponse::Pong))),
            "{r:?}"
        );
        assert_eq!(*a1_rec.geo_from.lock().unwrap(), vec!["west".to_string()]);
        let r = b1
            .call(1, &a1, PeerRequest::RemoveMember { node_id: 9 })
            .await;
        match r {
            Ok(PeerResponse::Refused(why)) => assert!(why.contains("cross-region"), "{why}"),
            other => panic!("a remote region's Raft traffic was not refused: {other:?}"),
        }
        let digest = Digest::sha256_of(b"x");
        let r = b1
            .put_blob(1, &a1, &digest, bytes::Bytes::from_static(b"x"))
            .await;
        assert!(r.is_err(), "a remote region stored a replica: {r:?}");
        // A CA the node does not trust cannot connect at all.
        let r = c1.call(1, &a1, PeerRequest::Geo(GeoRequest::Ping)).await;
        assert!(r.is_err(), "an untrusted region got an answer: {r:?}");
        assert_eq!(a1_rec.geo_from.lock().unwrap().len(), 1);
    }
}
