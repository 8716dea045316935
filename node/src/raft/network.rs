//! The Raft network: RPCs to peers over the `Transport` seam. A node without peer transport
//! (the single-node default) uses `LocalNetwork`, where every peer is unreachable.

use std::sync::Arc;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use super::{NodeId, NodeInfo, TypeConfig};
use crate::transport::{PeerRequest, PeerResponse, Transport, TransportError};

#[derive(Debug, thiserror::Error)]
#[error("node {0} has no transport to peers")]
pub struct NoTransport(NodeId);

#[derive(Debug, thiserror::Error)]
#[error("peer answered {0} with an unexpected message")]
pub struct UnexpectedAnswer(&'static str);

/// Raft network of a node without peers.
#[derive(Clone, Default)]
pub struct LocalNetwork;

pub struct NoPeer {
    target: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for LocalNetwork {
    type Network = NoPeer;

    async fn new_client(&mut self, target: NodeId, _node: &NodeInfo) -> Self::Network {
        NoPeer { target }
    }
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>;

impl RaftNetwork<TypeConfig> for NoPeer {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        Err(RPCError::Unreachable(Unreachable::new(&NoTransport(
            self.target,
        ))))
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        Err(RPCError::Unreachable(Unreachable::new(&NoTransport(
            self.target,
        ))))
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        Err(RPCError::Unreachable(Unreachable::new(&NoTransport(
            self.target,
        ))))
    }
}

/// Raft network over a `Transport`.
pub struct PeerNetwork<T: Transport> {
    pub transport: Arc<T>,
}

impl<T: Transport> Clone for PeerNetwork<T> {
    fn clone(&self) -> Self {
        PeerNetwork {
            transport: self.transport.clone(),
        }
    }
}

pub struct PeerClient<T: Transport> {
    transport: Arc<T>,
    target: NodeId,
    node: NodeInfo,
}

impl<T: Transport> RaftNetworkFactory<TypeConfig> for PeerNetwork<T> {
    type Network = PeerClient<T>;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> Self::Network {
        PeerClient {
            transport: self.transport.clone(),
            target,
            node: node.clone(),
        }
    }
}

fn transport_err<E: std::error::Error>(e: TransportError) -> RPCError<NodeId, NodeInfo, E> {
    match e {
        TransportError::Unreachable(..) | TransportError::Timeout(_) => {
            RPCError::Unreachable(Unreachable::new(&e))
        }
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

impl<T: Transport> PeerClient<T> {
    async fn call(&self, req: PeerRequest) -> Result<PeerResponse, TransportError> {
        self.transport.call(self.target, &self.node, req).await
    }

    fn remote<E: std::error::Error>(
        &self,
        e: RaftError<NodeId, E>,
    ) -> RPCError<NodeId, NodeInfo, RaftError<NodeId, E>> {
        RPCError::RemoteError(RemoteError::new_with_node(
            self.target,
            self.node.clone(),
            e,
        ))
    }
}

impl<T: Transport> RaftNetwork<TypeConfig> for PeerClient<T> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        match self.call(PeerRequest::AppendEntries(rpc)).await {
            Ok(PeerResponse::AppendEntries(r)) => r.map_err(|e| self.remote(e)),
            Ok(_) => Err(RPCError::Network(NetworkError::new(&UnexpectedAnswer(
                "append_entries",
            )))),
            Err(e) => Err(transport_err(e)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        match self.call(PeerRequest::InstallSnapshot(rpc)).await {
            Ok(PeerResponse::InstallSnapshot(r)) => r.map_err(|e| self.remote(e)),
            Ok(_) => Err(RPCError::Network(NetworkError::new(&UnexpectedAnswer(
                "install_snapshot",
            )))),
            Err(e) => Err(transport_err(e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        match self.call(PeerRequest::Vote(rpc)).await {
            Ok(PeerResponse::Vote(r)) => r.map_err(|e| self.remote(e)),
            Ok(_) => Err(RPCError::Network(NetworkError::new(&UnexpectedAnswer(
                "vote",
            )))),
            Err(e) => Err(transport_err(e)),
        }
    }
}
