//! The simulated network: every node's `Transport`, with per-region-pair latency, jitter
//! (which reorders messages), loss, duplication, and directional link cuts.
//!
//! A message crosses the network as bytes (bincode, as on the wire), so a duplicate is a
//! second decode of the same bytes. A message that is lost, cut or sent to a dead node never
//! arrives; the caller learns it when its call times out, as it would over QUIC.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use engine::Digest;
use node::peer::NodePeer;
use node::raft::{NodeId, NodeInfo};
use node::rt::{self, TaskScope};
use node::transport::{
    BlobBytes, BlobReader, GeoRequest, GeoResponse, PeerHandler, PeerRequest, PeerResponse,
    Transport, TransportError,
};
use rand::Rng;

use crate::SimPlatform;

/// How long a caller waits for an answer before giving up (the QUIC transport's bound).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What the network does to messages while faults are on.
#[derive(Debug, Clone, Copy, Default)]
pub struct NetFaults {
    /// Probability that a message (request or answer) is lost.
    pub loss: f64,
    /// Probability that a Raft RPC is delivered twice.
    pub duplicate: f64,
    /// Extra random delay per message, up to this many microseconds (reorders messages).
    pub jitter_us: u64,
}

/// Counters of what the network did.
#[derive(Debug, Clone, Default)]
pub struct NetStats {
    pub messages: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub cut: u64,
    pub blob_bytes: u64,
}

/// A node's cross-region side, behind dynamic dispatch: serving it reaches the transport
/// again (forwarded writes), and a named future type would make the transport's own future
/// type recursive.
pub trait GeoServe: Send + Sync + 'static {
    fn serve(
        &self,
        from: String,
        req: GeoRequest,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = GeoResponse> + Send>>;
}

struct Endpoint {
    region: usize,
    geo: Option<Arc<dyn GeoServe>>,
    /// `None` while the node is down.
    handler: Option<(Arc<NodePeer<SimPlatform>>, Arc<TaskScope>)>,
}

struct NetState {
    endpoints: BTreeMap<NodeId, Endpoint>,
    /// Directional cuts: messages from `.0` to `.1` are dropped.
    cut: BTreeSet<(NodeId, NodeId)>,
    /// One-way latency between regions `[a][b]`, microseconds.
    latency_us: Vec<Vec<u64>>,
    faults: NetFaults,
    stats: NetStats,
}

/// The network shared by every simulated node.
#[derive(Clone)]
pub struct SimNet {
    state: Arc<Mutex<NetState>>,
}

impl SimNet {
    /// `latency_us[a][b]` is the one-way latency from region `a` to region `b`.
    pub fn new(latency_us: Vec<Vec<u64>>) -> SimNet {
        SimNet {
            state: Arc::new(Mutex::new(NetState {
                endpoints: BTreeMap::new(),
                cut: BTreeSet::new(),
                latency_us,
                faults: NetFaults::default(),
                stats: NetStats::default(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NetState> {
        self.state.lock().expect("net lock")
    }

    pub fn add_node(&self, id: NodeId, region: usize) {
        self.lock().endpoints.insert(
            id,
            Endpoint {
                region,
                geo: None,
                handler: None,
            },
        );
    }

    /// The node is up and answers through `handler`, its tasks in `scope`.
    pub fn attach(&self, id: NodeId, handler: Arc<NodePeer<SimPlatform>>, scope: Arc<TaskScope>) {
        if let Some(e) = self.lock().endpoints.get_mut(&id) {
            e.handler = Some((handler, scope));
        }
    }

    /// The node serves other regions through `geo` (while it is up).
    pub fn attach_geo(&self, id: NodeId, geo: Arc<dyn GeoServe>) {
        if let Some(e) = self.lock().endpoints.get_mut(&id) {
            e.geo = Some(geo);
        }
    }

    /// The node is down: nothing reaches it.
    pub fn detach(&self, id: NodeId) {
        if let Some(e) = self.lock().endpoints.get_mut(&id) {
            e.handler = None;
            e.geo = None;
        }
    }

    fn geo(&self, id: NodeId) -> Option<Arc<dyn GeoServe>> {
        self.lock().endpoints.get(&id).and_then(|e| e.geo.clone())
    }

    pub fn set_faults(&self, f: NetFaults) {
        self.lock().faults = f;
    }

    pub fn cut(&self, from: NodeId, to: NodeId) {
        self.lock().cut.insert((from, to));
    }

    pub fn restore(&self, from: NodeId, to: NodeId) {
        self.lock().cut.remove(&(from, to));
    }

    pub fn heal_all(&self) {
        self.lock().cut.clear();
    }

    pub fn stats(&self) -> NetStats {
        self.lock().stats.clone()
    }

    /// Decides one message's fate: `Some(delay)` if it arrives, `None` if it is lost.
    fn route(&self, from: NodeId, to: NodeId, bytes: u64) -> Option<Duration> {
        let mut g = self.lock();
        g.stats.messages += 1;
        g.stats.blob_bytes += bytes;
        if g.cut.contains(&(from, to)) {
            g.stats.cut += 1;
            return None;
        }
        let (Some(a), Some(b)) = (g.endpoints.get(&from), g.endpoints.get(&to)) else {
            return None;
        };
        let base = g.latency_us[a.region][b.region];
        let f = g.faults;
        let (lost, jitter) = rt::with_rng(|r| {
            let lost = f.loss > 0.0 && r.gen_bool(f.loss);
            let jitter = if f.jitter_us > 0 {
                r.gen_range(0..=f.jitter_us)
            } else {
                0
            };
            (lost, jitter)
        });
        if lost {
            g.stats.lost += 1;
            return None;
        }
        // Bandwidth: 1 GB/s in a region, 100 MB/s across regions (microseconds per byte).
        let transfer_us = if a.region == b.region {
            bytes / 1000
        } else {
            bytes / 100
        };
        Some(Duration::from_micros(base + jitter + transfer_us))
    }

    fn should_duplicate(&self) -> bool {
        let mut g = self.lock();
        let p = g.faults.duplicate;
        let dup = p > 0.0 && rt::with_rng(|r| r.gen_bool(p));
        if dup {
            g.stats.duplicated += 1;
        }
        dup
    }

    fn region(&self, id: NodeId) -> Option<usize> {
        self.lock().endpoints.get(&id).map(|e| e.region)
    }

    fn handler(&self, id: NodeId) -> Option<(Arc<NodePeer<SimPlatform>>, Arc<TaskScope>)> {
        self.lock()
            .endpoints
            .get(&id)
            .and_then(|e| e.handler.clone())
    }

    /// Carries one exchange: the request to `to`, `serve` run there (as a task of that node,
    /// so a crash of `to` stops it), and the answer back. Never returns if a message is lost
    /// or the node is down; the caller bounds it with `CALL_TIMEOUT`.
    async fn exchange<R, F, Fut>(&self, from: NodeId, to: NodeId, out_bytes: u64, serve: F) -> R
    where
        R: Send + 'static,
        F: FnOnce(Arc<NodePeer<SimPlatform>>) -> Fut,
        Fut: std::future::Future<Output = (R, u64)> + Send + 'static,
    {
        let Some(delay) = self.route(from, to, out_bytes) else {
            return std::future::pending().await;
        };
        tokio::time::sleep(delay).await;
        let Some((handler, scope)) = self.handler(to) else {
            return std::future::pending().await;
        };
        use tracing::Instrument;
        let task = rt::spawn_in(
            &scope,
            serve(handler).instrument(tracing::info_span!("node", id = to)),
        );
        let Ok((answer, back_bytes)) = task.await else {
            // The node crashed while serving.
            return std::future::pending().await;
        };
        let Some(delay) = self.route(to, from, back_bytes) else {
            return std::future::pending().await;
        };
        tokio::time::sleep(delay).await;
        answer
    }
}

/// One node's view of the network.
pub struct SimTransport {
    pub me: NodeId,
    pub net: SimNet,
}

fn encode(req: &PeerRequest) -> Bytes {
    Bytes::from(bincode::serialize(req).expect("peer requests serialize"))
}

fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> T {
    bincode::deserialize(b).expect("what was serialized decodes")
}

impl SimTransport {
    async fn timed<T>(
        &self,
        target: NodeId,
        f: impl std::future::Future<Output = T>,
    ) -> Result<T, TransportError> {
        tokio::time::timeout(CALL_TIMEOUT, f)
            .await
            .map_err(|_| TransportError::Timeout(target))
    }
}

impl Transport for SimTransport {
    async fn call(
        &self,
        target: NodeId,
        _addr: &NodeInfo,
        req: PeerRequest,
    ) -> Result<PeerResponse, TransportError> {
        // QUIC delivers a stream at most once, so only the messages a peer must tolerate
        // twice anyway (Raft RPCs, late and repeated) are duplicated; forwarded writes and
        // membership changes are not idempotent and never arrive twice.
        let idempotent = matches!(
            req,
            PeerRequest::AppendEntries(_) | PeerRequest::Vote(_) | PeerRequest::InstallSnapshot(_)
        );
        let wire = encode(&req);
        if idempotent && self.net.should_duplicate() {
            let (net, me, dup) = (self.net.clone(), self.me, wire.clone());
            rt::spawn(async move {
                let _ = tokio::time::timeout(
                    CALL_TIMEOUT,
                    net.exchange(me, target, dup.len() as u64, |h| async move {
                        h.handle(decode(&dup)).await;
                        ((), 0)
                    }),
                )
                .await;
            });
        }
        let len = wire.len() as u64;
        // As QUIC classifies a connection by the CA that signed the peer: another region
        // may send only cross-region requests, and only another region may send them.
        let from = self.net.region(self.me);
        let across = from != self.net.region(target);
        let from_name = crate::cluster::region_name(from.unwrap_or(usize::MAX));
        let geo = self.net.geo(target);
        let answer: Bytes = self
            .timed(
                target,
                self.net.exchange(self.me, target, len, |h| async move {
                    let resp = match (decode(&wire), across) {
                        (PeerRequest::Geo(g), true) => match geo {
                            Some(geo) => PeerResponse::Geo(geo.serve(from_name, g).await),
                            None => PeerResponse::Geo(GeoResponse::Denied(
                                "this region replicates with no other region".into(),
                            )),
                        },
                        (PeerRequest::Geo(_), false) => PeerResponse::Refused(
                            "cross-region request from a node of this region".into(),
                        ),
                        (_, true) => PeerResponse::Refused(format!(
                            "region {from_name} may send only cross-region requests"
                        )),
                        (req, false) => h.handle(req).await,
                    };
                    let b = Bytes::from(bincode::serialize(&resp).expect("responses serialize"));
                    let n = b.len() as u64;
                    (b, n)
                }),
            )
            .await?;
        Ok(decode(&answer))
    }

    async fn put_blob(
        &self,
        target: NodeId,
        _addr: &NodeInfo,
        digest: &Digest,
        bytes: BlobBytes,
    ) -> Result<(), TransportError> {
        let digest = digest.clone();
        let len = bytes.len() as u64;
        let resp: PeerResponse = self
            .timed(
                target,
                self.net.exchange(self.me, target, len, |h| async move {
                    let body: BlobReader = Box::new(std::io::Cursor::new(bytes));
                    (h.store_blob(digest, len, body).await, 0)
                }),
            )
            .await?;
        match resp {
            PeerResponse::BlobStored => Ok(()),
            PeerResponse::Refused(reason) => Err(TransportError::Refused {
                peer: target,
                reason,
            }),
            other => Err(TransportError::Protocol {
                peer: target,
                reason: format!("unexpected answer {other:?}"),
            }),
        }
    }

    async fn get_blob(
        &self,
        target: NodeId,
        _addr: &NodeInfo,
        digest: &Digest,
    ) -> Result<Option<(u64, BlobReader)>, TransportError> {
        let digest = digest.clone();
        let found: Option<Bytes> = self
            .timed(
                target,
                self.net.exchange(self.me, target, 0, |h| async move {
                    let b = h.read_blob(&digest).await;
                    let n = b.as_ref().map_or(0, |b| b.len() as u64);
                    (b, n)
                }),
            )
            .await?;
        Ok(found.map(|b| {
            let len = b.len() as u64;
            let r: BlobReader = Box::new(std::io::Cursor::new(b));
            (len, r)
        }))
    }
}
