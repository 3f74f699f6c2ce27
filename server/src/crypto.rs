//! Secrets at rest. HMAC secrets must be known to the server to verify
//! signatures, so they cannot be hashed; they are sealed with
//! ChaCha20-Poly1305 under a master key that lives outside the store (an
//! environment variable or a file). Each ciphertext is bound to its key id
//! and secret id (as associated data), so ciphertexts cannot be swapped
//! between keys. Bearer API keys are only ever stored as SHA-256 hashes.

use std::fmt;
use std::path::Path;

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use sha2::{Digest, Sha256};

/// Why a master key could not be used. Never contains key material.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("the master key must be 64 hex characters (32 bytes)")]
    BadMasterKey,
    #[error("cannot read the master key file {0}")]
    Unreadable(String),
    #[error(
        "a stored secret cannot be decrypted: wrong master key, or the store was tampered with"
    )]
    Decrypt,
}

/// The key that seals stored secrets.
pub struct MasterKey {
    /// Kept to rebuild the sealing key on `clone` (`LessSafeKey` is not
    /// `Clone`); never printed.
    raw: [u8; 32],
    key: LessSafeKey,
    /// A fingerprint (not the key) to recognise the key a store was written with.
    fingerprint: String,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Clone for MasterKey {
    fn clone(&self) -> Self {
        Self::from_hex(&hex::encode(self.raw)).expect("a valid key stays valid")
    }
}

impl MasterKey {
    /// From 64 hex characters (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<Self, CryptoError> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut bytes).map_err(|_| CryptoError::BadMasterKey)?;
        let key = LessSafeKey::new(
            UnboundKey::new(&CHACHA20_POLY1305, &bytes).map_err(|_| CryptoError::BadMasterKey)?,
        );
        let digest =
            Sha256::digest([b"warden master key fingerprint\0".as_slice(), &bytes].concat());
        Ok(Self {
            raw: bytes,
            key,
            fingerprint: hex::encode(&digest[..8]),
        })
    }

    pub fn from_file(path: &Path) -> Result<Self, CryptoError> {
        let text = std::fs::read_to_string(path)
            .map_err(|_| CryptoError::Unreadable(path.display().to_string()))?;
        Self::from_hex(&text)
    }

    /// A fresh random key, as hex (for `serve --dev` and key rotation).
    pub fn generate_hex() -> String {
        random_hex(32)
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Seals `plaintext`; the result is `nonce || ciphertext || tag`, hex.
    pub fn seal(&self, context: &str, plaintext: &[u8]) -> String {
        let nonce = random_bytes::<12>();
        let mut data = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                &mut data,
            )
            .expect("sealing fits in memory");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        hex::encode(out)
    }

    /// Opens what [`Self::seal`] produced with the same `context`.
    pub fn open(&self, context: &str, sealed: &str) -> Result<Vec<u8>, CryptoError> {
        let bytes = hex::decode(sealed).map_err(|_| CryptoError::Decrypt)?;
        if bytes.len() < 12 + 16 {
            return Err(CryptoError::Decrypt);
        }
        let (nonce, rest) = bytes.split_at(12);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoError::Decrypt)?;
        let mut data = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(context.as_bytes()), &mut data)
            .map_err(|_| CryptoError::Decrypt)?;
        Ok(plain.to_vec())
    }
}

/// The stored form of a bearer API key.
pub fn api_key_hash(api_key: &str) -> String {
    hex::encode(Sha256::digest(api_key.as_bytes()))
}

/// `bytes` random bytes as lowercase hex (ids, secrets, API keys).
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the OS random source is available");
    hex::encode(buf)
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).expect("the OS random source is available");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_with_the_same_key_and_context() {
        let key = MasterKey::from_hex(&MasterKey::generate_hex()).unwrap();
        let sealed = key.seal("k1/s1", b"the secret");
        assert!(!sealed.contains(&hex::encode(b"the secret")));
        assert_eq!(key.open("k1/s1", &sealed).unwrap(), b"the secret");
        assert_eq!(key.open("k2/s1", &sealed), Err(CryptoError::Decrypt));
        let other = MasterKey::from_hex(&MasterKey::generate_hex()).unwrap();
        assert_eq!(other.open("k1/s1", &sealed), Err(CryptoError::Decrypt));
        // Two seals of the same secret differ (fresh nonce).
        assert_ne!(sealed, key.seal("k1/s1", b"the secret"));
    }

    #[test]
    fn bad_master_keys_are_refused_without_echoing_them() {
        let err = MasterKey::from_hex("not-hex-secret-material").unwrap_err();
        assert!(!err.to_string().contains("secret-material"));
        assert!(MasterKey::from_hex(&"ab".repeat(31)).is_err());
    }
}
