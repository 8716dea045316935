//! OCI content digests: `algorithm:encoded`.
//!
//! Owns: strict parsing (sha256 required, sha512 accepted, lowercase hex of the exact length),
//! hashing bytes into a digest, and the streaming [`DigestHasher`].
//! Never: accepts anything the OCI grammar does not, or normalises input (uppercase hex is
//! rejected, not lowered), so one blob has exactly one name.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// A hash algorithm a digest may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// Length of the hex encoding.
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// Why a string is not a digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest has no ':' separating algorithm and hex")]
    NoSeparator,
    #[error("unsupported digest algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    #[error("{algorithm} digest has {len} hex characters, expected {expected}")]
    BadLength {
        algorithm: &'static str,
        len: usize,
        expected: usize,
    },
    #[error("digest hex must be lowercase [0-9a-f]")]
    BadHex,
}

/// A validated OCI digest. The encoded part is stored as lowercase hex. Deserializing
/// validates too (a digest from a peer names files).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "DigestRepr")]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

/// `Digest`'s encoded shape, checked before it becomes a `Digest`.
#[derive(Deserialize)]
struct DigestRepr {
    algorithm: Algorithm,
    hex: String,
}

impl TryFrom<DigestRepr> for Digest {
    type Error = DigestError;
    fn try_from(r: DigestRepr) -> Result<Digest, DigestError> {
        Digest::parse(&format!("{}:{}", r.algorithm.name(), r.hex))
    }
}

impl Digest {
    pub fn parse(s: &str) -> Result<Digest, DigestError> {
        let (alg, hex) = s.split_once(':').ok_or(DigestError::NoSeparator)?;
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            other => {
                let shown: String = other.chars().take(32).collect();
                return Err(DigestError::UnsupportedAlgorithm(shown));
            }
        };
        if hex.len() != algorithm.hex_len() {
            return Err(DigestError::BadLength {
                algorithm: algorithm.name(),
                len: hex.len(),
                expected: algorithm.hex_len(),
            });
        }
        if !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestError::BadHex);
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_string(),
        })
    }

    /// The sha256 digest of `bytes`.
    pub fn sha256_of(bytes: &[u8]) -> Digest {
        Digest::from_sha256_bytes(&sha2::Sha256::digest(bytes))
    }

    /// The digest of `bytes` under `algorithm`.
    pub fn of(algorithm: Algorithm, bytes: &[u8]) -> Digest {
        let mut h = DigestHasher::new(algorithm);
        h.update(bytes);
        h.finish()
    }

    pub fn from_sha256_bytes(raw: &[u8]) -> Digest {
        assert_eq!(raw.len(), 32, "sha256 output is 32 bytes");
        Digest {
            algorithm: Algorithm::Sha256,
            hex: hex::encode(raw),
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

/// A running hash in one of the supported algorithms.
#[derive(Clone)]
pub enum DigestHasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl DigestHasher {
    pub fn new(algorithm: Algorithm) -> DigestHasher {
        match algorithm {
            Algorithm::Sha256 => DigestHasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => DigestHasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            DigestHasher::Sha256(h) => h.update(bytes),
            DigestHasher::Sha512(h) => h.update(bytes),
        }
    }

    pub fn finish(self) -> Digest {
        match self {
            DigestHasher::Sha256(h) => Digest {
                algorithm: Algorithm::Sha256,
                hex: hex::encode(h.finalize()),
            },
            DigestHasher::Sha512(h) => Digest {
                algorithm: Algorithm::Sha512,
                hex: hex::encode(h.finalize()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str =
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_displays_sha256() {
        let d = Digest::parse(EMPTY_SHA256).unwrap();
        assert_eq!(d.algorithm(), Algorithm::Sha256);
        assert_eq!(d.to_string(), EMPTY_SHA256);
        assert_eq!(Digest::sha256_of(b""), d);
    }

    #[test]
    fn accepts_sha512() {
        let d = Digest::of(Algorithm::Sha512, b"abc");
        assert_eq!(d.hex().len(), 128);
        assert_eq!(Digest::parse(&d.to_string()).unwrap(), d);
    }

    #[test]
    fn rejects_malformed() {
        let bad = [
            "",
            "sha256",
            "sha256:",
            ":abc",
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b8555",
            "sha256:g3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "SHA256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85/",
            "sha256+b64:abc",
            "sha256::e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85",
        ];
        for s in bad {
            assert!(Digest::parse(s).is_err(), "accepted {s:?}");
        }
    }

    #[test]
    fn streaming_hash_matches_one_shot() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let mut h = DigestHasher::new(Algorithm::Sha256);
        for part in data.chunks(333) {
            h.update(part);
        }
        assert_eq!(h.finish(), Digest::sha256_of(&data));
    }
}
