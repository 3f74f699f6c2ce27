//! What warden reads of Envoy's ext_authz `CheckRequest`, decoded straight
//! from the wire.
//!
//! The types here have the field numbers and wire types of the official
//! messages (`envoy_types`, from Envoy's protos), and only the fields
//! warden uses. Decoding the official message was a fifth of the server's
//! CPU per ext_authz call under h2load (one connection, 64 calls in
//! flight): every header put into a `HashMap` (SipHash, rehashing as it
//! grew, two `String`s each), the body copied out of its frame, and every
//! field warden never reads (the destination peer, the context extensions,
//! metadata, the TLS session) built only to be dropped. Here the headers
//! are a list, the body is a slice of the frame it arrived in, and the
//! fields warden does not read are skipped: their framing is checked, their
//! contents are not.
//!
//! A `map<string, string>` is, on the wire, a repeated message of `key`
//! (1) and `value` (2); [`Header`] is that message, kept in the order sent.
//! Where a name is sent twice, the last is the one read, as in a map.

use bytes::Bytes;

/// `envoy.service.auth.v3.CheckRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckRequest {
    #[prost(message, optional, tag = "1")]
    pub attributes: Option<AttributeContext>,
}

/// `envoy.service.auth.v3.AttributeContext`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AttributeContext {
    #[prost(message, optional, tag = "1")]
    pub source: Option<Peer>,
    #[prost(message, optional, tag = "4")]
    pub request: Option<Request>,
}

/// `AttributeContext.Peer`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Peer {
    #[prost(message, optional, tag = "1")]
    pub address: Option<Address>,
    #[prost(string, tag = "4")]
    pub principal: String,
}

/// `envoy.config.core.v3.Address`, of which warden reads only a socket
/// address (the first of its `oneof`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Address {
    #[prost(message, optional, tag = "1")]
    pub socket_address: Option<SocketAddress>,
}

/// `envoy.config.core.v3.SocketAddress`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SocketAddress {
    #[prost(string, tag = "2")]
    pub address: String,
}

/// `AttributeContext.Request`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Request {
    #[prost(message, optional, tag = "2")]
    pub http: Option<HttpRequest>,
}

/// `AttributeContext.HttpRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpRequest {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub method: String,
    /// `map<string, string> headers`.
    #[prost(message, repeated, tag = "3")]
    pub headers: Vec<Header>,
    #[prost(string, tag = "4")]
    pub path: String,
    #[prost(int64, tag = "9")]
    pub size: i64,
    /// A `string` in the proto: checked to be UTF-8 before it is answered
    /// ([`HttpRequest::text_is_utf8`]), as the official decoder checks it.
    #[prost(bytes = "bytes", tag = "11")]
    pub body: Bytes,
    #[prost(bytes = "bytes", tag = "12")]
    pub raw_body: Bytes,
    #[prost(message, optional, tag = "13")]
    pub header_map: Option<HeaderMap>,
}

impl HttpRequest {
    /// Whether `body`, a `string` field read as bytes, is the UTF-8 the
    /// official decoder requires of it.
    pub fn text_is_utf8(&self) -> bool {
        std::str::from_utf8(&self.body).is_ok()
    }
}

/// One entry of `HttpRequest.headers`: a name (lowercase, as Envoy sends
/// it) and its value (the lines of a header joined with commas).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Header {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `envoy.config.core.v3.HeaderMap`, sent instead of `headers` when Envoy
/// is set to `encode_raw_headers`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderMap {
    #[prost(message, repeated, tag = "1")]
    pub headers: Vec<HeaderValue>,
}

/// `envoy.config.core.v3.HeaderValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderValue {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
    #[prost(bytes = "vec", tag = "3")]
    pub raw_value: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3 as core;
    use envoy_types::pb::envoy::service::auth::v3 as auth;
    use proptest::prelude::*;
    use prost::Message;
    use std::collections::HashMap;

    /// An official `CheckRequest` with every field Envoy fills in, those
    /// warden skips included.
    fn official(
        headers: HashMap<String, String>,
        body: String,
        raw_body: Vec<u8>,
        principal: String,
    ) -> auth::CheckRequest {
        let peer = |address: &str, principal: String| auth::attribute_context::Peer {
            address: Some(core::Address {
                address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                    address: address.to_owned(),
                    port_specifier: Some(core::socket_address::PortSpecifier::PortValue(443)),
                    ..Default::default()
                })),
            }),
            service: "frontend".to_owned(),
            labels: HashMap::from([("app".to_owned(), "web".to_owned())]),
            principal,
            certificate: "-----BEGIN CERTIFICATE-----".to_owned(),
        };
        auth::CheckRequest {
            attributes: Some(auth::AttributeContext {
                source: Some(peer("203.0.113.7", principal)),
                destination: Some(peer("10.0.3.17", "spiffe://shop/api".to_owned())),
                request: Some(auth::attribute_context::Request {
                    time: Some(Default::default()),
                    http: Some(auth::attribute_context::HttpRequest {
                        id: "13359530607844510314".to_owned(),
                        method: "POST".to_owned(),
                        headers,
                        path: "/v1/orders?limit=10".to_owned(),
                        host: "api.shop.example".to_owned(),
                        scheme: "https".to_owned(),
                        size: body.len() as i64,
                        protocol: "HTTP/2".to_owned(),
                        body,
                        raw_body,
                        ..Default::default()
                    }),
                }),
                context_extensions: HashMap::from([("route".to_owned(), "orders".to_owned())]),
                ..Default::default()
            }),
        }
    }

    proptest! {
        /// Whatever Envoy sends, warden reads the same fields from the wire
        /// as the official decoder gives: every header (none lost or
        /// changed, whatever the map's order on the wire), the body, the
        /// source and the request's id, method, path and size.
        #[test]
        fn reads_what_the_official_decoder_reads(
            headers in proptest::collection::hash_map("[a-z:-]{1,12}", "[ -~]{0,40}", 0..24),
            body in "\\PC{0,300}",
            raw_body in proptest::collection::vec(any::<u8>(), 0..64),
            principal in "[ -~]{0,40}",
        ) {
            let sent = official(headers.clone(), body.clone(), raw_body.clone(), principal.clone());
            let read = CheckRequest::decode(sent.encode_to_vec().as_slice()).unwrap();
            let attributes = read.attributes.unwrap();
            let http = attributes.request.unwrap().http.unwrap();
            let read_headers: HashMap<String, String> =
                http.headers.iter().map(|h| (h.key.clone(), h.value.clone())).collect();
            prop_assert_eq!(http.headers.len(), headers.len());
            prop_assert_eq!(read_headers, headers);
            prop_assert_eq!(&http.body[..], body.as_bytes());
            prop_assert!(http.text_is_utf8());
            prop_assert_eq!(&http.raw_body[..], &raw_body[..]);
            prop_assert_eq!(http.id, "13359530607844510314");
            prop_assert_eq!(http.method, "POST");
            prop_assert_eq!(http.path, "/v1/orders?limit=10");
            prop_assert_eq!(http.size, body.len() as i64);
            let source = attributes.source.unwrap();
            prop_assert_eq!(source.principal, principal);
            prop_assert_eq!(source.address.unwrap().socket_address.unwrap().address, "203.0.113.7");
        }
    }

    /// `encode_raw_headers`: Envoy's `header_map` instead of `headers`.
    #[test]
    fn reads_the_raw_header_map() {
        let mut sent = official(HashMap::new(), String::new(), Vec::new(), String::new());
        let http = sent.attributes.as_mut().unwrap().request.as_mut().unwrap();
        http.http.as_mut().unwrap().header_map = Some(core::HeaderMap {
            headers: vec![
                core::HeaderValue {
                    key: "X-Forwarded-For".to_owned(),
                    value: "203.0.113.7".to_owned(),
                    ..Default::default()
                },
                core::HeaderValue {
                    key: "x-nonce".to_owned(),
                    raw_value: b"n-1".to_vec(),
                    ..Default::default()
                },
            ],
        });
        let read = CheckRequest::decode(sent.encode_to_vec().as_slice()).unwrap();
        let http = read.attributes.unwrap().request.unwrap().http.unwrap();
        assert!(http.headers.is_empty());
        let map = http.header_map.unwrap().headers;
        assert_eq!(map.len(), 2);
        assert_eq!(
            (map[0].key.as_str(), map[0].value.as_str()),
            ("X-Forwarded-For", "203.0.113.7")
        );
        assert_eq!(
            (map[1].key.as_str(), &map[1].raw_value[..]),
            ("x-nonce", &b"n-1"[..])
        );
    }

    /// A header name sent twice is read as a map reads it: the last one.
    #[test]
    fn a_name_sent_twice_reads_as_the_last() {
        use crate::gateway::Headers;
        let sent = HttpRequest {
            headers: vec![
                Header {
                    key: "x-nonce".to_owned(),
                    value: "first".to_owned(),
                },
                Header {
                    key: "x-nonce".to_owned(),
                    value: "last".to_owned(),
                },
            ],
            ..Default::default()
        };
        let wire = sent.encode_to_vec();
        let official = auth::attribute_context::HttpRequest::decode(wire.as_slice()).unwrap();
        let read = HttpRequest::decode(wire.as_slice()).unwrap();
        assert_eq!(official.headers["x-nonce"], "last");
        assert_eq!(Headers::get(&read.headers[..], "x-nonce"), Some("last"));
        assert!(Headers::present(&read.headers[..], "x-nonce"));
    }
}
