//! The SHA-256 of a payload's exact bytes, the value seed invariant 3 is about.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A SHA-256 digest as 64 lower-case hex characters.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PayloadHash(String);

impl PayloadHash {
    /// Hashes `bytes` exactly as given: no re-serialisation, no trimming.
    pub fn of(bytes: &[u8]) -> Self {
        Self(hex::encode(Sha256::digest(bytes)))
    }

    /// Accepts only the canonical form (64 lower-case hex digits), so that two equal digests
    /// always compare equal as strings in every store.
    pub fn parse(text: &str) -> Result<Self, String> {
        let canonical = text.len() == 64
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if canonical {
            Ok(Self(text.to_owned()))
        } else {
            Err("must be 64 lower-case hexadecimal characters".to_owned())
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for PayloadHash {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        Self::parse(&text)
    }
}

impl From<PayloadHash> for String {
    fn from(hash: PayloadHash) -> String {
        hash.0
    }
}

impl fmt::Display for PayloadHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PayloadHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PayloadHash({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_of_the_empty_object_matches_the_published_sha256() {
        assert_eq!(
            PayloadHash::of(b"{}").as_str(),
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
    }

    #[test]
    fn upper_case_or_short_digests_are_rejected() {
        assert!(PayloadHash::parse(&"A".repeat(64)).is_err());
        assert!(PayloadHash::parse(&"a".repeat(63)).is_err());
        assert!(PayloadHash::parse(&"g".repeat(64)).is_err());
        assert!(PayloadHash::parse(&"a".repeat(64)).is_ok());
    }
}
