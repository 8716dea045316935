//! What this node answers to its peers: Raft RPCs, writes forwarded by followers,
//! membership changes, and blob replicas.

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

use engine::Digest;

use crate::raft::{NodeId, NodeInfo, Raft};
use crate::registry::{NodeRegistry, Platform, Production};
use crate::transport::{
    BlobBytes, BlobReader, GeoRequest, GeoResponse, PeerHandler, PeerRequest, PeerResponse,
};

/// The node's side of peer traffic. The transport starts before Raft (Raft needs the
/// transport), so the node is attached once it exists; until then peers are refused.
pub struct NodePeer<P: Platform = Production> {
    node: OnceLock<(Raft, Arc<NodeRegistry<P>>)>,
    geo: OnceLock<Arc<crate::georep::Georep<P>>>,
    /// `raft.learner_catch_up_ms`.
    pub catch_up: std::time::Duration,
}

impl<P: Platform> NodePeer<P> {
    pub fn new(catch_up: std::time::Duration) -> Self {
        NodePeer {
            node: OnceLock::new(),
            geo: OnceLock::new(),
            catch_up,
        }
    }

    pub fn attach(&self, raft: Raft, registry: Arc<NodeRegistry<P>>) {
        let _ = self.node.set((raft, registry));
    }

    /// Serves other regions' requests with `geo` (cross-region replication configured).
    pub fn attach_geo(&self, geo: Arc<crate::georep::Georep<P>>) {
        let _ = self.geo.set(geo);
    }
}

/// Adds `node_id` as a learner, waits (bounded) until it has caught up, then makes it a voter.
/// A learner that cannot catch up (unreachable, or refusing this cluster's certificate) is
/// removed again and the join fails.
pub async fn add_member(
    raft: &Raft,
    node_id: NodeId,
    info: NodeInfo,
    catch_up: std::time::Duration,
) -> Result<(), String> {
    let added = raft
        .add_learner(node_id, info, false)
        .await
        .map_err(|e| format!("add learner {node_id}: {e}"))?;
    let target = added.log_id.index;
    let caught_up = raft
        .wait(Some(catch_up))
        .metrics(
            |m| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(&node_id))
                    .and_then(|matched| *matched)
                    .is_some_and(|l| l.index >= target)
            },
            "learner caught up",
        )
        .await;
    if caught_up.is_err() {
        let _ = raft
            .change_membership(
                openraft::ChangeMembers::RemoveNodes(BTreeSet::from([node_id])),
                false,
            )
            .await;
        return Err(format!(
            "node {node_id} did not catch up within {} s (unreachable, or not of this cluster)",
            catch_up.as_secs()
        ));
    }
    let m = raft.metrics().borrow().membership_config.clone();
    let mut voters: BTreeSet<NodeId> = m.membership().voter_ids().collect();
    voters.insert(node_id);
    raft.change_membership(voters, false)
        .await
        .map_err(|e| format!("promote {node_id} to voter: {e}"))?;
    Ok(())
}

/// Removes `node_id` from the voters and the membership.
pub async fn remove_member(raft: &Raft, node_id: NodeId) -> Result<(), String> {
    let m = raft.metrics().borrow().membership_config.clone();
    let voters: BTreeSet<NodeId> = m
        .membership()
        .voter_ids()
        .filter(|v| *v != node_id)
        .collect();
    if voters.is_empty() {
        return Err("cannot remove the last voter".into());
    }
    raft.change_membership(voters, false)
        .await
        .map_err(|e| format!("remove {node_id}: {e}"))?;
    Ok(())
}

impl<P: Platform> PeerHandler for NodePeer<P> {
    async fn handle(&self, req: PeerRequest) -> PeerResponse {
        let Some((raft, _)) = self.node.get() else {
            return PeerResponse::Refused("node is starting".into());
        };
        match req {
            PeerRequest::AppendEntries(r) => {
                PeerResponse::AppendEntries(raft.append_entries(r).await)
            }
            PeerRequest::Vote(r) => PeerResponse::Vote(raft.vote(r).await),
            PeerRequest::InstallSnapshot(r) => {
                PeerResponse::InstallSnapshot(raft.install_snapshot(r).await)
            }
            PeerRequest::ClientWrite(r) => match raft.client_write(r).await {
                Ok(resp) => PeerResponse::ClientWrite {
                    index: resp.log_id.index,
                    response: resp.data,
                },
                Err(e) => PeerResponse::Refused(e.to_string()),
            },
            PeerRequest::AddMember { node_id, info } => {
                match add_member(raft, node_id, info, self.catch_up).await {
                    Ok(()) => PeerResponse::MembershipChanged,
                    Err(e) => PeerResponse::Refused(e),
                }
            }
            PeerRequest::RemoveMember { node_id } => match remove_member(raft, node_id).await {
                Ok(()) => PeerResponse::MembershipChanged,
                Err(e) => PeerResponse::Refused(e),
            },
            PeerRequest::BlobPut { .. } | PeerRequest::BlobGet { .. } => {
                PeerResponse::Refused("blob transfers are handled by the transport".into())
            }
            PeerRequest::Geo(_) => {
                PeerResponse::Refused("cross-region requests come from other regions".into())
            }
        }
    }

    async fn store_blob(&self, digest: Digest, size_bytes: u64, body: BlobReader) -> PeerResponse {
        let Some((_, registry)) = self.node.get() else {
            return PeerResponse::Refused("node is starting".into());
        };
        match registry.store_replica(digest, size_bytes, body).await {
            Ok(()) => PeerResponse::BlobStored,
            Err(e) => PeerResponse::Refused(e.to_string()),
        }
    }

    async fn handle_geo(&self, from: &str, req: GeoRequest) -> GeoResponse {
        match self.geo.get() {
            Some(g) => g.serve(from, req).await,
            None => GeoResponse::Denied("this region replicates with no other region".into()),
        }
    }

    async fn read_blob(&self, digest: &Digest) -> Option<BlobBytes> {
        let (_, registry) = self.node.get()?;
        registry.local_blob_bytes(digest).await.ok().flatten()
    }
}
