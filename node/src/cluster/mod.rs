//! Running a region of several nodes: certificates, membership, placement of blob replicas.

pub mod certs;
pub mod placement;
