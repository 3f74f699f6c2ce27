//! The gRPC codec of warden's services: prost, with one difference. A
//! `CheckRequest` that cannot be decoded (say, invalid UTF-8 in a string
//! field) is not a gRPC error that ends the call: it decodes to a marked
//! request that the server answers in-band with `REASON_MALFORMED`. A
//! gateway multiplexes many users' checks on one `CheckStream`; one bad
//! message must not take the others down with it.
//!
//! The mark lives in the request itself because tonic's generated services
//! hand the handler nothing but the decoded message: a `method` no decoded
//! request can pass validation with, and the safe message in `path`.
//! [`undecodable`] reads it back. Every other message type decodes exactly
//! as with `tonic_prost::ProstCodec`.

use std::any::{Any, TypeId};
use std::marker::PhantomData;

use prost::Message;
use prost::bytes::Buf;
use tonic::Status;
use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstEncoder};

use crate::proto::CheckRequest;

/// The `method` of a request that could not be decoded. Validation refuses
/// it anyway (methods are ASCII letters).
const UNDECODABLE: &str = "\0undecodable";

/// The codec named in `build.rs` for every generated service.
#[derive(Debug, Clone)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = LenientDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        LenientDecoder(PhantomData)
    }
}

/// Decodes with prost; an undecodable `CheckRequest` becomes a marked one.
#[derive(Debug)]
pub struct LenientDecoder<U>(PhantomData<U>);

impl<U: Message + Default + 'static> Decoder for LenientDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        match U::decode(&mut *buf) {
            Ok(message) => Ok(Some(message)),
            Err(error) => {
                // Whatever prost left unread belongs to this message: the
                // next one starts after it.
                buf.advance(buf.remaining());
                if TypeId::of::<U>() != TypeId::of::<CheckRequest>() {
                    return Err(Status::internal(format!(
                        "failed to decode Protobuf message: {error}"
                    )));
                }
                let marked: Box<dyn Any> = Box::new(marked(&error));
                Ok(Some(*marked.downcast::<U>().expect("U is CheckRequest")))
            }
        }
    }
}

/// Decodes one `CheckRequest` as this codec does: an undecodable one
/// becomes a marked request ([`undecodable`]). For a server that reads the
/// message itself; from a `Bytes`, the body is a slice of it, not a copy.
pub fn decode_check_request(message: impl Buf) -> CheckRequest {
    decode_check_request_into(CheckRequest::default(), message)
}

/// [`decode_check_request`] into `spare`, a request already answered: the
/// room its strings hold is used again instead of allocated afresh. A
/// stream decodes each request into the one before it: six allocations and
/// as many frees fewer per streamed check, and a request's drop. Every
/// field of `spare` is cleared first, so what comes out is exactly what
/// [`decode_check_request`] gives for `message`, whatever `spare` held.
pub fn decode_check_request_into(spare: CheckRequest, message: impl Buf) -> CheckRequest {
    let mut request = spare;
    // prost's `decode` is `merge` into `default()`; `clear` is `default()`
    // with the strings' and lists' room kept.
    request.clear();
    match request.merge(message) {
        Ok(()) => request,
        Err(error) => marked(&error),
    }
}

fn marked(error: &prost::DecodeError) -> CheckRequest {
    CheckRequest {
        method: UNDECODABLE.to_owned(),
        path: safe_message(error),
        ..Default::default()
    }
}

/// Fields a decode error may name; anything else is described generally,
/// so nothing the client sent is echoed.
const FIELDS: &[&str] = &[
    "key_id",
    "method",
    "path",
    "query",
    "body",
    "body_sha256",
    "scheme",
    "timestamp",
    "nonce",
    "signature",
    "limits",
    "cost",
    "dry_run",
    "request_id",
    "client_identity",
    "api_key",
    "client_address",
    "policy",
    "descriptor",
];

/// "path: not valid UTF-8", from prost's "failed to decode Protobuf message:
/// CheckRequest.path: invalid string value: data is not UTF-8 encoded".
fn safe_message(error: &prost::DecodeError) -> String {
    let text = error.to_string();
    let field = text
        .split(|c: char| c.is_whitespace() || c == ':')
        .filter_map(|word| word.rsplit_once('.').map(|(_, field)| field))
        .find(|field| FIELDS.contains(field));
    let what = if text.contains("UTF-8") {
        "not valid UTF-8"
    } else {
        "could not be decoded"
    };
    match field {
        Some(field) => format!("{field}: {what}"),
        None => GENERIC.to_owned(),
    }
}

/// The safe MALFORMED message for a request that could not be decoded, or
/// `None` for a decoded one. A decoded request can carry the marker too (a
/// string may hold a NUL); its `path` is then the client's text, so only a
/// message this codec writes is passed on, never anything else.
pub fn undecodable(request: &CheckRequest) -> Option<&str> {
    if request.method != UNDECODABLE {
        return None;
    }
    let ours = request.path.split_once(": ").is_some_and(|(field, what)| {
        (FIELDS.contains(&field) && matches!(what, "not valid UTF-8" | "could not be decoded"))
            || (field == "request" && what == "not a valid CheckRequest message")
    });
    Some(if ours { request.path.as_str() } else { GENERIC })
}

const GENERIC: &str = "request: not a valid CheckRequest message";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decode_error_names_the_field_and_nothing_the_client_sent() {
        // Field 3 (path), length 2, bytes that are not UTF-8.
        let bytes = [0x1a, 0x02, 0xff, 0xfe];
        let error = CheckRequest::decode(&bytes[..]).unwrap_err();
        assert_eq!(safe_message(&error), "path: not valid UTF-8");
        let garbage = [0x1a, 0x7f];
        let error = CheckRequest::decode(&garbage[..]).unwrap_err();
        assert!(
            safe_message(&error).ends_with("could not be decoded")
                || safe_message(&error).starts_with("request:")
        );
    }

    #[test]
    fn a_decoded_request_posing_as_undecodable_echoes_nothing() {
        let posing = CheckRequest {
            method: UNDECODABLE.to_owned(),
            path: "evil\n{\"event\":\"forged\"}".to_owned(),
            ..Default::default()
        };
        assert_eq!(undecodable(&posing), Some(GENERIC));
        let ours = CheckRequest {
            method: UNDECODABLE.to_owned(),
            path: "path: not valid UTF-8".to_owned(),
            ..Default::default()
        };
        assert_eq!(undecodable(&ours), Some("path: not valid UTF-8"));
        assert_eq!(undecodable(&CheckRequest::default()), None);
    }

    mod spare {
        use proptest::collection::{btree_map, vec};
        use proptest::prelude::*;

        use super::*;
        use crate::proto::LimitRequest;

        /// Any request, every field of it possibly set.
        fn request() -> impl Strategy<Value = CheckRequest> {
            let text = || "[a-z0-9\\-]{0,12}";
            let limits = vec((text(), text()), 0..3).prop_map(|limits| {
                limits
                    .into_iter()
                    .map(|(policy, descriptor)| LimitRequest { policy, descriptor })
                    .collect::<Vec<_>>()
            });
            (
                (text(), text(), text(), text(), vec(any::<u8>(), 0..40)),
                (
                    vec(any::<u8>(), 0..33),
                    text(),
                    any::<i64>(),
                    text(),
                    text(),
                ),
                (limits, any::<u32>(), any::<bool>(), text(), text()),
                (text(), text(), btree_map(text(), text(), 0..3)),
            )
                .prop_map(|(a, b, c, d)| CheckRequest {
                    key_id: a.0,
                    method: a.1,
                    path: a.2,
                    query: a.3,
                    body: a.4.into(),
                    body_sha256: b.0,
                    scheme: b.1,
                    timestamp: b.2,
                    nonce: b.3,
                    signature: b.4,
                    limits: c.0,
                    cost: c.1,
                    dry_run: c.2,
                    request_id: c.3,
                    client_identity: c.4,
                    api_key: d.0,
                    client_address: d.1,
                    headers: d.2.into_iter().collect(),
                })
        }

        proptest! {
            /// A spare request leaks nothing into the next: whatever it
            /// held, decoding into it gives what decoding afresh gives, for
            /// a request and for bytes that do not decode.
            #[test]
            fn decoding_into_a_spare_request_gives_what_decoding_afresh_gives(
                spare in request(),
                next in request(),
                garbage in vec(any::<u8>(), 0..60),
            ) {
                // Decoding afresh, as prost decodes, with the codec's mark.
                let afresh = |bytes: &[u8]| {
                    CheckRequest::decode(bytes).unwrap_or_else(|error| marked(&error))
                };
                let encoded = prost::bytes::Bytes::from(next.encode_to_vec());
                let reused = decode_check_request_into(spare.clone(), encoded.clone());
                prop_assert_eq!(&reused, &next);
                prop_assert_eq!(reused, afresh(&encoded));
                let reused = decode_check_request_into(spare, &garbage[..]);
                prop_assert_eq!(reused, afresh(&garbage));
            }
        }
    }
}
