//! Where a blob's replicas live: rendezvous (highest-random-weight) hashing over the region's
//! members, so every node computes the same holders without coordination, and a membership
//! change moves only the blobs whose top-R set changed.

use engine::Digest;

/// Replicas per blob in a region of `members` nodes: R = min(3, members).
pub const REPLICAS_MAX: usize = 3;

pub fn replica_count(members: usize) -> usize {
    members.min(REPLICAS_MAX)
}

/// Copies that must be durable before a push is acknowledged: a majority of R.
pub fn write_quorum(replicas: usize) -> usize {
    replicas / 2 + 1
}

fn score(node: u64, digest: &Digest) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&node.to_be_bytes());
    h.update(digest.to_string().as_bytes());
    *h.finalize().as_bytes()
}

/// The `replica_count(members.len())` members that should hold `digest`, best first.
pub fn holders(members: &[u64], digest: &Digest) -> Vec<u64> {
    let mut scored: Vec<([u8; 32], u64)> =
        members.iter().map(|m| (score(*m, digest), *m)).collect();
    scored.sort_unstable_by(|a, b| b.cmp(a));
    scored
        .into_iter()
        .take(replica_count(members.len()))
        .map(|(_, m)| m)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts() {
        assert_eq!(replica_count(1), 1);
        assert_eq!(replica_count(2), 2);
        assert_eq!(replica_count(5), 3);
        assert_eq!(write_quorum(1), 1);
        assert_eq!(write_quorum(2), 2);
        assert_eq!(write_quorum(3), 2);
    }

    #[test]
    fn stable_and_spread() {
        let members = [1, 2, 3, 4, 5];
        let mut load = [0usize; 6];
        for i in 0..3000u32 {
            let d = Digest::sha256_of(&i.to_le_bytes());
            let h = holders(&members, &d);
            assert_eq!(h.len(), 3);
            assert_eq!(h, holders(&members, &d), "placement is deterministic");
            // Removing a non-holder changes nothing.
            let spare = members.iter().find(|m| !h.contains(m)).copied().unwrap();
            let fewer: Vec<u64> = members.iter().copied().filter(|m| *m != spare).collect();
            assert_eq!(holders(&fewer, &d), h);
            for m in h {
                load[m as usize] += 1;
            }
        }
        for m in members {
            assert!(
                (1400..=2200).contains(&load[m as usize]),
                "node {m} holds {}",
                load[m as usize]
            );
        }
    }
}
