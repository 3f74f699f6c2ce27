//! Verifying request signatures. The canonical strings come from
//! `warden_client::signing`, the one implementation signers use too, so the
//! two sides cannot drift apart.

use subtle::{Choice, ConstantTimeEq};
use warden_client::signing::{body_sha256, ts_body_string_to_sign, warden_v1_string_to_sign};

use crate::model::Secret;

pub use warden_client::signing::{SCHEME_TS_BODY, SCHEME_WARDEN_V1, is_valid_nonce};

/// A signing scheme of `proto/SIGNING.md`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    WardenV1,
    TsBody,
}

impl Scheme {
    /// Parses the wire name; empty means the default, `warden-v1`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "" | SCHEME_WARDEN_V1 => Some(Self::WardenV1),
            SCHEME_TS_BODY => Some(Self::TsBody),
            _ => None,
        }
    }
}

/// The body as the gateway gave it: the bytes, or only their SHA-256.
#[derive(Clone, Copy, Debug)]
pub enum Body<'a> {
    Bytes(&'a [u8]),
    Sha256(&'a [u8; 32]),
}

/// Everything that goes into a signature.
#[derive(Clone, Copy, Debug)]
pub struct Signed<'a> {
    pub scheme: Scheme,
    pub timestamp: i64,
    pub nonce: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a str,
    pub body: Body<'a>,
}

impl Signed<'_> {
    /// The exact bytes the client signed. `TsBody` always carries the body
    /// bytes (request validation guarantees it).
    pub fn message(&self) -> Vec<u8> {
        match self.scheme {
            Scheme::WardenV1 => {
                let digest = match self.body {
                    Body::Bytes(b) => body_sha256(b),
                    Body::Sha256(d) => *d,
                };
                warden_v1_string_to_sign(
                    self.timestamp,
                    self.nonce,
                    self.method,
                    self.path,
                    self.query,
                    &digest,
                )
                .into_bytes()
            }
            Scheme::TsBody => match self.body {
                Body::Bytes(b) => ts_body_string_to_sign(self.timestamp, b),
                Body::Sha256(_) => ts_body_string_to_sign(self.timestamp, b""),
            },
        }
    }
}

/// 64 hex digits (either case) as the 32 bytes they spell: how signatures
/// arrive. A table lookup per digit; the `hex` crate's general decoder was
/// a tenth of an in-process check. Nothing here is secret (the text is what
/// the client sent), so branching on it leaks nothing.
pub fn hex32(text: &str) -> Option<[u8; 32]> {
    const INVALID: u8 = 0xff;
    const VALUE: [u8; 256] = {
        let mut table = [INVALID; 256];
        let mut i = 0;
        while i < 10 {
            table[b'0' as usize + i] = i as u8;
            i += 1;
        }
        let mut i = 0;
        while i < 6 {
            table[b'a' as usize + i] = 10 + i as u8;
            table[b'A' as usize + i] = 10 + i as u8;
            i += 1;
        }
        table
    };
    let digits: &[u8; 64] = text.as_bytes().try_into().ok()?;
    let mut out = [0u8; 32];
    let mut bad = 0u8;
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let (hi, lo) = (VALUE[usize::from(pair[0])], VALUE[usize::from(pair[1])]);
        bad |= (hi | lo) & 0xf0;
        *byte = (hi << 4) | (lo & 0x0f);
    }
    (bad == 0).then_some(out)
}

/// Whether `signature` is the HMAC of `message` under any of `secrets`.
/// Every secret is tried and compared in constant time, so neither the
/// outcome nor which secret matched shows in the timing.
pub fn verify<'a>(
    secrets: impl IntoIterator<Item = &'a Secret>,
    message: &[u8],
    signature: &[u8; 32],
) -> bool {
    let mut matched = Choice::from(0);
    for secret in secrets {
        matched |= secret.hmac(message).ct_eq(signature);
    }
    matched.into()
}

/// Burns the time of one verification, for requests whose key is unknown,
/// so that an unknown key and a bad signature take the same time.
pub fn verify_nothing(message: &[u8], signature: &[u8; 32]) -> bool {
    let _ = verify([decoy_secret()], message, signature);
    false
}

/// The secret an unknown key is verified with (and then refused anyway),
/// for every signature format. Keyed once, like real keys' secrets, so that
/// an unknown key costs the same time as a known one.
pub fn decoy_secret() -> &'static Secret {
    static DECOY: std::sync::LazyLock<Secret> =
        std::sync::LazyLock::new(|| Secret::new(vec![0x5a; 32]));
    &DECOY
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex32_accepts_exactly_64_hex_digits_of_either_case() {
        let bytes: [u8; 32] = std::array::from_fn(|i| (i * 8 + 3) as u8);
        let lower = hex::encode(bytes);
        assert_eq!(hex32(&lower), Some(bytes));
        assert_eq!(hex32(&lower.to_uppercase()), Some(bytes));
        for bad in [
            &lower[..62],
            &format!("{lower}00"),
            &format!("g{}", &lower[1..]),
            &format!("{} ", &lower[..63]),
            &format!("{}\u{e9}", &lower[..62]),
            "",
        ] {
            assert_eq!(hex32(bad), None, "{bad:?}");
        }
        // Every byte that is not a hex digit is refused in every position.
        for b in 0..=255u8 {
            if b.is_ascii_hexdigit() || !b.is_ascii() {
                continue;
            }
            let mut text = lower.clone().into_bytes();
            text[17] = b;
            assert_eq!(hex32(std::str::from_utf8(&text).unwrap()), None, "{b}");
        }
    }

    /// The shared vectors, computed by an independent implementation from the
    /// text of DESIGN.md; `proto/SIGNING.md` publishes them.
    #[test]
    fn every_published_vector_verifies_and_a_flipped_bit_does_not() {
        let text = include_str!("../../proto/signing-vectors.json");
        let doc: serde_json::Value = serde_json::from_str(text).unwrap();
        let vectors = doc["vectors"].as_array().unwrap();
        assert!(vectors.len() >= 5);
        for v in vectors {
            let s = |k: &str| v[k].as_str().unwrap_or("").to_owned();
            let scheme = Scheme::parse(&s("scheme")).unwrap();
            let body = hex::decode(s("body_hex")).unwrap();
            let (nonce, method, path, query) = (s("nonce"), s("method"), s("path"), s("query"));
            let signed = Signed {
                scheme,
                timestamp: v["timestamp"].as_i64().unwrap(),
                nonce: &nonce,
                method: &method,
                path: &path,
                query: &query,
                body: Body::Bytes(&body),
            };
            let message = signed.message();
            match scheme {
                Scheme::WardenV1 => {
                    assert_eq!(
                        String::from_utf8(message.clone()).unwrap(),
                        s("string_to_sign")
                    );
                    assert_eq!(
                        warden_client::signing::canonical_query(&query),
                        s("canonical_query")
                    );
                }
                Scheme::TsBody => assert_eq!(hex::encode(&message), s("string_to_sign_hex")),
            }
            let mut signature: [u8; 32] = hex::decode(s("signature")).unwrap().try_into().unwrap();
            // The right secret second: a rotated-in secret verifies too.
            let secrets = [
                Secret::new(b"some-other-secret-of-32-bytes-or-more".to_vec()),
                Secret::new(s("secret").into_bytes()),
            ];
            assert!(verify(&secrets, &message, &signature), "vector {v}");
            assert!(!verify(&secrets[..1], &message, &signature));
            signature[0] ^= 1;
            assert!(!verify(&secrets, &message, &signature));
        }
    }

    #[test]
    fn signing_md_publishes_every_vector() {
        let doc = include_str!("../../proto/SIGNING.md");
        let json: serde_json::Value =
            serde_json::from_str(include_str!("../../proto/signing-vectors.json")).unwrap();
        let vectors = json["vectors"].as_array().unwrap();
        for v in vectors {
            let signature = v["signature"].as_str().unwrap();
            assert!(
                doc.contains(signature),
                "SIGNING.md lacks the vector signed {signature}"
            );
        }
    }
}
