//! The signing schemes of `proto/SIGNING.md`, shared by signers and by the
//! warden server's verifier so that both sides build the exact same bytes.
//!
//! Two schemes exist:
//! - `warden-v1`: HMAC-SHA256 over timestamp, nonce, method, path, canonical
//!   query and the body's SHA-256, joined by `\n`.
//! - `ts-body`: HMAC-SHA256 over `timestamp + "." + body` (the common
//!   Django / Stripe-style recipe). It has no nonce; the signature itself is
//!   the replay key.

use std::borrow::Cow;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::proto::CheckRequest;

/// Header names the signers write and gateways forward to warden.
pub const HEADER_KEY_ID: &str = "X-Key-Id";
pub const HEADER_TIMESTAMP: &str = "X-Timestamp";
pub const HEADER_NONCE: &str = "X-Nonce";
pub const HEADER_SIGNATURE: &str = "X-Signature";

/// Name of the default scheme on the wire.
pub const SCHEME_WARDEN_V1: &str = "warden-v1";
/// Name of the body-only scheme on the wire.
pub const SCHEME_TS_BODY: &str = "ts-body";

/// Nonces are 16 to 64 characters of `[A-Za-z0-9_-]`.
pub const NONCE_MIN_LEN: usize = 16;
pub const NONCE_MAX_LEN: usize = 64;

/// SHA-256 of the empty body, the hash line of every bodiless request.
pub const EMPTY_BODY_SHA256_HEX: &str =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Whether `nonce` has the length and alphabet the scheme requires. A table
/// lookup per byte, every byte looked at: a third of the instructions of
/// testing each byte's class (callgrind, a streamed check).
pub fn is_valid_nonce(nonce: &str) -> bool {
    const ALLOWED: [bool; 256] = {
        let mut table = [false; 256];
        let mut b = 0;
        while b < 256 {
            let c = b as u8;
            table[b] = c.is_ascii_alphanumeric() || c == b'_' || c == b'-';
            b += 1;
        }
        table
    };
    (NONCE_MIN_LEN..=NONCE_MAX_LEN).contains(&nonce.len())
        && nonce
            .bytes()
            .fold(true, |all, b| all & ALLOWED[usize::from(b)])
}

/// The canonical form of a raw query string (without the leading `?`).
///
/// Pieces are split on `&` (empty ones dropped), each at its first `=`; name
/// and value are percent-decoded (`+` stays a literal plus, a `%` without two
/// hex digits stays a literal `%`), re-encoded with every byte outside RFC 3986
/// unreserved as uppercase `%XX`, sorted bytewise by name then value, and
/// joined with `&`.
pub fn canonical_query(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len() + 8);
    push_canonical_query(&mut out, raw);
    out
}

/// [`canonical_query`], written onto the end of `out`. A query that is
/// canonical already (the usual case: names and values of unreserved
/// characters, every piece with its `=`, in order) is copied as it is,
/// without splitting it into a sorted list first.
fn push_canonical_query(out: &mut String, raw: &str) {
    if is_canonical_query(raw) {
        out.push_str(raw);
    } else {
        push_sorted_query(out, raw);
    }
}

/// Splits, re-encodes and sorts: the definition of the canonical query.
fn push_sorted_query(out: &mut String, raw: &str) {
    let mut pairs: Vec<(Cow<'_, str>, Cow<'_, str>)> = raw
        .split('&')
        .filter(|piece| !piece.is_empty())
        .map(|piece| {
            let (name, value) = piece.split_once('=').unwrap_or((piece, ""));
            (reencode(name), reencode(value))
        })
        .collect();
    pairs.sort_unstable();
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(name);
        out.push('=');
        out.push_str(value);
    }
}

/// Whether [`canonical_query`] would give `raw` back unchanged: pieces of
/// `name=value` with both of unreserved characters only, none empty, in
/// strictly ascending (name, value) order (equal pieces are kept twice by
/// the sort, which the strict order refuses here: they take the slow path).
fn is_canonical_query(raw: &str) -> bool {
    if raw.is_empty() {
        return true;
    }
    let mut previous: Option<(&str, &str)> = None;
    for piece in raw.split('&') {
        let Some((name, value)) = piece.split_once('=') else {
            return false;
        };
        if !name.bytes().chain(value.bytes()).all(is_unreserved) {
            return false;
        }
        if previous.is_some_and(|p| p >= (name, value)) {
            return false;
        }
        previous = Some((name, value));
    }
    true
}

/// Percent-decodes `s` and encodes it again in the one canonical way. Most
/// names and values are canonical already (unreserved characters only):
/// those are borrowed, not copied, since this runs for every signed check.
fn reencode(s: &str) -> Cow<'_, str> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    if s.bytes().all(is_unreserved) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    for byte in percent_decoded(s) {
        if is_unreserved(byte) {
            out.push(byte as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(byte >> 4)] as char);
            out.push(HEX[usize::from(byte & 0x0f)] as char);
        }
    }
    Cow::Owned(out)
}

/// The bytes of `text` with each `%XX` (hex, either case) decoded once; a
/// `%` not followed by two hex digits stands for itself. The one reading of
/// percent-encoding warden has: for the canonical query here, and for the
/// server's reading of a path as the application behind a gateway sees it.
pub fn percent_decoded(text: &str) -> impl Iterator<Item = u8> + '_ {
    let bytes = text.as_bytes();
    let mut i = 0;
    std::iter::from_fn(move || {
        let b = *bytes.get(i)?;
        let hex = |j: usize| bytes.get(j).copied().and_then(hex_value);
        if b == b'%'
            && let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2))
        {
            i += 3;
            return Some((hi << 4) | lo);
        }
        i += 1;
        Some(b)
    })
}

/// RFC 3986's unreserved characters: the ones never percent-encoded.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The `warden-v1` string to sign. `body_sha256` is the raw 32-byte digest.
pub fn warden_v1_string_to_sign(
    timestamp: i64,
    nonce: &str,
    method: &str,
    path: &str,
    query: &str,
    body_sha256: &[u8; 32],
) -> String {
    let mut out = String::with_capacity(
        SCHEME_WARDEN_V1.len() + 24 + nonce.len() + method.len() + path.len() + query.len() + 80,
    );
    // Written in place: this runs for every signed check, and temporary
    // strings (and hex's char-by-char encoder) were a measurable share.
    out.push_str(SCHEME_WARDEN_V1);
    out.push('\n');
    out.push_str(itoa::Buffer::new().format(timestamp));
    out.push('\n');
    out.push_str(nonce);
    out.push('\n');
    out.extend(method.chars().map(|c| c.to_ascii_uppercase()));
    out.push('\n');
    out.push_str(path);
    out.push('\n');
    push_canonical_query(&mut out, query);
    out.push('\n');
    let mut digest_hex = [0u8; 64];
    hex::encode_to_slice(body_sha256, &mut digest_hex).expect("32 bytes make 64 hex digits");
    out.push_str(std::str::from_utf8(&digest_hex).expect("hex digits are ASCII"));
    out
}

/// The `ts-body` string to sign: `timestamp + "." + body`, as bytes since the
/// body need not be UTF-8.
pub fn ts_body_string_to_sign(timestamp: i64, body: &[u8]) -> Vec<u8> {
    let ts = timestamp.to_string();
    let mut out = Vec::with_capacity(ts.len() + 1 + body.len());
    out.extend_from_slice(ts.as_bytes());
    out.push(b'.');
    out.extend_from_slice(body);
    out
}

/// SHA-256 of a body.
pub fn body_sha256(body: &[u8]) -> [u8; 32] {
    Sha256::digest(body).into()
}

/// HMAC-SHA256 of `message` under `secret`.
pub fn hmac_sha256(secret: &[u8], message: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// A fresh random nonce: 32 characters of `[0-9a-f]` (128 bits).
pub fn new_nonce() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    hex::encode(bytes)
}

/// Current Unix time in whole seconds.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Signs outgoing requests with one key, producing the four `X-*` headers.
///
/// The secret is the HMAC key as bytes (for keys from `warden serve --dev` or
/// `warden keys create`: the UTF-8 bytes of the `secret` string).
#[derive(Clone)]
pub struct Signer {
    key_id: String,
    secret: Vec<u8>,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        f.debug_struct("Signer")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// The signing headers of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedHeaders {
    pub key_id: String,
    pub timestamp: i64,
    pub nonce: String,
    pub signature: String,
}

impl SignedHeaders {
    /// The headers as (name, value) pairs, ready to set on an HTTP request.
    pub fn to_pairs(&self) -> [(&'static str, String); 4] {
        [
            (HEADER_KEY_ID, self.key_id.clone()),
            (HEADER_TIMESTAMP, self.timestamp.to_string()),
            (HEADER_NONCE, self.nonce.clone()),
            (HEADER_SIGNATURE, self.signature.clone()),
        ]
    }
}

impl Signer {
    pub fn new(key_id: impl Into<String>, secret: impl Into<Vec<u8>>) -> Self {
        Self {
            key_id: key_id.into(),
            secret: secret.into(),
        }
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Signs a request now, with a fresh nonce, under `warden-v1`.
    pub fn sign(&self, method: &str, path: &str, query: &str, body: &[u8]) -> SignedHeaders {
        self.sign_at(unix_now(), &new_nonce(), method, path, query, body)
    }

    /// Signs under `warden-v1` with a given timestamp and nonce (for tests
    /// and for callers that manage their own clock).
    pub fn sign_at(
        &self,
        timestamp: i64,
        nonce: &str,
        method: &str,
        path: &str,
        query: &str,
        body: &[u8],
    ) -> SignedHeaders {
        let message =
            warden_v1_string_to_sign(timestamp, nonce, method, path, query, &body_sha256(body));
        SignedHeaders {
            key_id: self.key_id.clone(),
            timestamp,
            nonce: nonce.to_owned(),
            signature: hex::encode(hmac_sha256(&self.secret, message.as_bytes())),
        }
    }

    /// Signs under `ts-body` (no nonce; the signature is the replay key).
    pub fn sign_ts_body_at(&self, timestamp: i64, body: &[u8]) -> SignedHeaders {
        let message = ts_body_string_to_sign(timestamp, body);
        SignedHeaders {
            key_id: self.key_id.clone(),
            timestamp,
            nonce: String::new(),
            signature: hex::encode(hmac_sha256(&self.secret, &message)),
        }
    }

    /// A ready `CheckRequest` for a request signed now under `warden-v1`, as a
    /// gateway would build it from the incoming request and its headers.
    pub fn check_request(
        &self,
        method: &str,
        path: &str,
        query: &str,
        body: &[u8],
    ) -> CheckRequest {
        let headers = self.sign(method, path, query, body);
        check_request_from(&headers, SCHEME_WARDEN_V1, method, path, query, body)
    }
}

/// Builds the `CheckRequest` for a request and the signing headers it carried.
pub fn check_request_from(
    headers: &SignedHeaders,
    scheme: &str,
    method: &str,
    path: &str,
    query: &str,
    body: &[u8],
) -> CheckRequest {
    CheckRequest {
        key_id: headers.key_id.clone(),
        method: method.to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        body: body.to_vec().into(),
        scheme: scheme.to_owned(),
        timestamp: headers.timestamp,
        nonce: headers.nonce.clone(),
        signature: headers.signature.clone(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The shortcut for queries that are canonical already gives what
        /// splitting, re-encoding and sorting gives, for any query.
        #[test]
        fn a_query_taken_as_it_is_is_the_canonical_one(
            pieces in proptest::collection::vec("[ab-]{0,2}(=[ab1]{0,2})?|[ab=&%+1-]{0,4}", 0..5),
        ) {
            // Mostly pieces that are canonical on their own, so that whole
            // queries often are too, in or out of order.
            let raw = pieces.join("&");
            let mut sorted = String::new();
            push_sorted_query(&mut sorted, &raw);
            proptest::prop_assert_eq!(canonical_query(&raw), sorted);
        }
    }

    #[test]
    fn canonical_query_sorts_and_reencodes() {
        assert_eq!(canonical_query(""), "");
        assert_eq!(canonical_query("b=2&a=1"), "a=1&b=2");
        assert_eq!(canonical_query("q=a+b&x=%2b"), "q=a%2Bb&x=%2B");
        assert_eq!(canonical_query("flag&empty=&&z=9"), "empty=&flag=&z=9");
        assert_eq!(canonical_query("p=%zz&r=%7e%7E"), "p=%25zz&r=~~");
        assert_eq!(canonical_query("a=%4"), "a=%254");
        assert_eq!(canonical_query("a=%"), "a=%25");
        assert_eq!(canonical_query("a=b=c"), "a=b%3Dc");
        // Already canonical: given back as it is.
        assert_eq!(canonical_query("a=1&b=2&b=3&c="), "a=1&b=2&b=3&c=");
        // Sorted by name, then value, not as whole pieces: "a" < "a-b".
        assert_eq!(canonical_query("a-b=2&a=1"), "a=1&a-b=2");
        assert_eq!(canonical_query("a=2&a=1"), "a=1&a=2");
        assert_eq!(canonical_query("a=1&a=1"), "a=1&a=1");
        assert_eq!(canonical_query("=x&a=1"), "=x&a=1");
    }

    #[test]
    fn nonce_alphabet_and_length_are_enforced() {
        assert!(is_valid_nonce("abcdefghijklmnop"));
        assert!(is_valid_nonce(&"a".repeat(64)));
        assert!(!is_valid_nonce("short"));
        assert!(!is_valid_nonce(&"a".repeat(65)));
        assert!(!is_valid_nonce("abcdefghijklmno!"));
        assert!(is_valid_nonce(&new_nonce()));
    }

    #[test]
    fn the_nonce_alphabet_is_exactly_letters_digits_underscore_and_hyphen() {
        for b in 0..=255u8 {
            let expected = b.is_ascii_alphanumeric() || b == b'_' || b == b'-';
            let mut nonce = vec![b'a'; 16];
            nonce[7] = b;
            let Ok(nonce) = String::from_utf8(nonce) else {
                continue;
            };
            assert_eq!(is_valid_nonce(&nonce), expected, "byte {b:#04x}");
        }
        assert!(
            !is_valid_nonce("abcdefghijklmnoé"),
            "a multi-byte character"
        );
    }

    #[test]
    fn signer_debug_hides_the_secret() {
        let signer = Signer::new("k1", "super-secret-value");
        assert!(!format!("{signer:?}").contains("super-secret-value"));
    }
}
