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
//! are one [`HeaderList`], the body is a slice of the frame it arrived in,
//! and the fields warden does not read are skipped: their framing is
//! checked, their contents are not.
//!
//! A `map<string, string>` is, on the wire, a repeated message of `key`
//! (1) and `value` (2); [`HeaderList`] keeps those entries in the order
//! sent. Where a name is sent twice, the last is the one read, as in a map.

use bytes::{Buf, BufMut, Bytes};
use prost::DecodeError;
use prost::encoding::{self, DecodeContext, WireType};

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
///
/// Read by hand rather than derived, for its headers: they are most of
/// every call's message, and a derived `map<string, string>` (or a list of
/// entries) takes two `String`s per header, each allocated, copied and
/// freed again. Here they go into one [`HeaderList`]. The other fields are
/// read by prost's own functions, as the derived code reads them.
#[derive(Clone, PartialEq, Default, Debug)]
pub struct HttpRequest {
    /// Field 1.
    pub id: String,
    /// Field 2.
    pub method: String,
    /// Field 3, `map<string, string> headers`.
    pub headers: HeaderList,
    /// Field 4.
    pub path: String,
    /// Field 9.
    pub size: i64,
    /// Field 11, a `string` in the proto: checked to be UTF-8 before it is
    /// answered ([`HttpRequest::text_is_utf8`]), as the official decoder
    /// checks it.
    pub body: Bytes,
    /// Field 12.
    pub raw_body: Bytes,
    /// Field 13.
    pub header_map: Option<HeaderMap>,
}

impl HttpRequest {
    /// Whether `body`, a `string` field read as bytes, is the UTF-8 the
    /// official decoder requires of it.
    pub fn text_is_utf8(&self) -> bool {
        std::str::from_utf8(&self.body).is_ok()
    }
}

impl prost::Message for HttpRequest {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        put_text(1, &self.id, buf);
        put_text(2, &self.method, buf);
        for (key, value) in self.headers.iter() {
            encoding::encode_key(3, WireType::LengthDelimited, buf);
            encoding::encode_varint(entry_len(key, value) as u64, buf);
            put_text(1, key, buf);
            put_text(2, value, buf);
        }
        put_text(4, &self.path, buf);
        if self.size != 0 {
            encoding::int64::encode(9, &self.size, buf);
        }
        if !self.body.is_empty() {
            encoding::bytes::encode(11, &self.body, buf);
        }
        if !self.raw_body.is_empty() {
            encoding::bytes::encode(12, &self.raw_body, buf);
        }
        if let Some(map) = &self.header_map {
            encoding::message::encode(13, map, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let at = |field: &'static str| {
            move |mut e: DecodeError| {
                e.push("HttpRequest", field);
                e
            }
        };
        match tag {
            1 => encoding::string::merge(wire_type, &mut self.id, buf, ctx).map_err(at("id")),
            2 => {
                encoding::string::merge(wire_type, &mut self.method, buf, ctx).map_err(at("method"))
            }
            3 => self
                .headers
                .merge_entry(wire_type, buf, ctx)
                .map_err(at("headers")),
            4 => encoding::string::merge(wire_type, &mut self.path, buf, ctx).map_err(at("path")),
            9 => encoding::int64::merge(wire_type, &mut self.size, buf, ctx).map_err(at("size")),
            11 => encoding::bytes::merge(wire_type, &mut self.body, buf, ctx).map_err(at("body")),
            12 => encoding::bytes::merge(wire_type, &mut self.raw_body, buf, ctx)
                .map_err(at("raw_body")),
            13 => encoding::message::merge(
                wire_type,
                self.header_map.get_or_insert_with(HeaderMap::default),
                buf,
                ctx,
            )
            .map_err(at("header_map")),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(key, value)| field_len(3, entry_len(key, value)))
            .sum();
        text_len(1, &self.id)
            + text_len(2, &self.method)
            + headers
            + text_len(4, &self.path)
            + if self.size != 0 {
                encoding::int64::encoded_len(9, &self.size)
            } else {
                0
            }
            + if self.body.is_empty() {
                0
            } else {
                encoding::bytes::encoded_len(11, &self.body)
            }
            + if self.raw_body.is_empty() {
                0
            } else {
                encoding::bytes::encoded_len(12, &self.raw_body)
            }
            + self
                .header_map
                .as_ref()
                .map_or(0, |m| encoding::message::encoded_len(13, m))
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// The length of a length-delimited field of `len` bytes, with its key.
fn field_len(tag: u32, len: usize) -> usize {
    encoding::key_len(tag) + encoding::encoded_len_varint(len as u64) + len
}

/// The length of one header entry's message: its name (1) and value (2),
/// each left out when empty, as proto3 leaves them out.
fn entry_len(key: &str, value: &str) -> usize {
    text_len(1, key) + text_len(2, value)
}

/// The length of a `string` field as [`put_text`] writes it.
fn text_len(tag: u32, s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        field_len(tag, s.len())
    }
}

/// A `string` field, left out when empty.
fn put_text(tag: u32, s: &str, buf: &mut impl BufMut) {
    if !s.is_empty() {
        encoding::encode_key(tag, WireType::LengthDelimited, buf);
        encoding::encode_varint(s.len() as u64, buf);
        buf.put_slice(s.as_bytes());
    }
}

/// `HttpRequest.headers`, a `map<string, string>`: each name (lowercase,
/// as Envoy sends it) and value (the lines of a header joined with
/// commas), in the order sent.
///
/// Every name and value is kept in one `String`, and each entry as where
/// its two texts are in it: a call's headers cost two allocations between
/// them, not two each. Only text checked to be UTF-8 goes into it, so each
/// name and value is a slice of it, read without checking again.
#[derive(Clone, PartialEq, Eq, Default, Debug)]
pub struct HeaderList {
    text: String,
    /// Each entry's name and value, as ranges of `text`.
    entries: Vec<[u32; 4]>,
}

impl HeaderList {
    /// Entries a call's list has room for before it grows: more than
    /// Envoy sends for a browser's request.
    const ROOM: usize = 32;

    /// Adds an entry at the end.
    pub fn push(&mut self, key: &str, value: &str) {
        let key = self.append(key);
        let value = self.append(value);
        self.entries.push([key.0, key.1, value.0, value.1]);
    }

    /// Every entry, in the order sent.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&str, &str)> {
        self.entries.iter().map(|&[k0, k1, v0, v1]| {
            (
                &self.text[k0 as usize..k1 as usize],
                &self.text[v0 as usize..v1 as usize],
            )
        })
    }

    /// The value of the last entry named `name`, as a map reads it.
    pub fn last(&self, name: &str) -> Option<&str> {
        let entry = self.entries.iter().rev().find(|e| self.names(e, name))?;
        Some(&self.text[entry[2] as usize..entry[3] as usize])
    }

    /// Whether any entry is named `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.iter().any(|e| self.names(e, name))
    }

    /// Whether `entry` is named `name`: compared as bytes, lengths first,
    /// as most entries are not the one looked for.
    fn names(&self, entry: &[u32; 4], name: &str) -> bool {
        (entry[1] - entry[0]) as usize == name.len()
            && &self.text.as_bytes()[entry[0] as usize..entry[1] as usize] == name.as_bytes()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `s` at the end of `text`, and where it went.
    fn append(&mut self, s: &str) -> (u32, u32) {
        if self.text.capacity() == 0 {
            // Under 1 KiB, so that the allocator's per-thread cache
            // serves it (it keeps chunks of up to 1,032 bytes).
            self.text.reserve(1000);
            self.entries.reserve(Self::ROOM);
        }
        let start = self.text.len();
        self.text.push_str(s);
        // A message is bounded far below 4 GiB (`max_message_bytes`); a
        // list built otherwise that outgrew that would read back wrong, so
        // it stops the process rather than answer from it.
        let end = u32::try_from(self.text.len()).expect("headers under 4 GiB");
        (start as u32, end)
    }

    /// Reads one entry, a `Header` message (`key` = 1, `value` = 2, both
    /// `string`), from `buf`: as prost reads a message field, refusing what
    /// it refuses, with each text checked and appended where it lies.
    fn merge_entry(
        &mut self,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        encoding::check_wire_type(WireType::LengthDelimited, wire_type)?;
        let len = encoding::decode_varint(buf)?;
        if len > buf.remaining() as u64 {
            return Err(underflow());
        }
        // Everything read below stays within the entry: a field that
        // claims more is short of bytes, as prost finds it.
        let mut entry = buf.take(len as usize);
        // A name or value left out is empty, as proto3 leaves it out; one
        // sent twice is read as the last.
        let (mut key, mut value) = (None, None);
        while entry.has_remaining() {
            let (tag, wire_type) = encoding::decode_key(&mut entry)?;
            match tag {
                1 | 2 => {
                    encoding::check_wire_type(WireType::LengthDelimited, wire_type)?;
                    let range = Some(self.append_text(&mut entry)?);
                    if tag == 1 {
                        key = range;
                    } else {
                        value = range;
                    }
                }
                _ => encoding::skip_field(wire_type, tag, &mut entry, ctx.clone())?,
            }
        }
        let end = u32::try_from(self.text.len()).expect("headers under 4 GiB");
        let (key, value) = (key.unwrap_or((end, end)), value.unwrap_or((end, end)));
        self.entries.push([key.0, key.1, value.0, value.1]);
        Ok(())
    }

    /// Reads a `string` field's length and text from `buf`, checks it is
    /// UTF-8, and appends it.
    fn append_text(&mut self, buf: &mut impl Buf) -> Result<(u32, u32), DecodeError> {
        let len = encoding::decode_varint(buf)?;
        if len > buf.remaining() as u64 {
            return Err(underflow());
        }
        let len = len as usize;
        // Every buffer warden decodes from is one piece; one that is not
        // is read through a copy.
        let range = if buf.chunk().len() >= len {
            let text = std::str::from_utf8(&buf.chunk()[..len]).map_err(|_| not_utf8())?;
            self.append(text)
        } else {
            let copy = buf.copy_to_bytes(len);
            let text = std::str::from_utf8(&copy).map_err(|_| not_utf8())?;
            return Ok(self.append(text));
        };
        buf.advance(len);
        Ok(range)
    }
}

/// prost's own error for a length past the end of its buffer. prost makes
/// its errors only in its own functions (`DecodeError::new` is deprecated
/// as internal), so this one is had from prost, from a field that claims a
/// byte it does not have. Only a malformed message comes here.
#[cold]
fn underflow() -> DecodeError {
    encoding::skip_field(
        WireType::LengthDelimited,
        1,
        &mut &[1u8][..],
        DecodeContext::default(),
    )
    .expect_err("a length of 1 with nothing after it is short")
}

/// prost's own error for a `string` that is not UTF-8, had the same way.
#[cold]
fn not_utf8() -> DecodeError {
    encoding::string::merge(
        WireType::LengthDelimited,
        &mut String::new(),
        &mut &[1u8, 0xff][..],
        DecodeContext::default(),
    )
    .expect_err("0xff is not UTF-8")
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
    use crate::gateway::Headers;
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
                http.headers.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
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

    /// One field of a header entry as it may come on the wire, from any
    /// sender: the name or value (well-formed or not), or a field the entry
    /// does not have.
    #[derive(Debug, Clone)]
    enum EntryField {
        Text(u32, Vec<u8>),
        Varint(u32, u64),
        Fixed32(u32),
        /// A length-delimited field whose length runs past what follows.
        Overrun(u32),
        /// A wire type the entry's text fields cannot have.
        WrongType(u32),
    }

    fn entry_field() -> impl Strategy<Value = EntryField> {
        let tag = prop_oneof![Just(1u32), Just(2u32), 3u32..6];
        let text = prop_oneof![
            "[ -~]{0,12}".prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 0..6),
        ];
        prop_oneof![
            8 => (tag.clone(), text).prop_map(|(t, b)| EntryField::Text(t, b)),
            1 => (3u32..6, any::<u64>()).prop_map(|(t, v)| EntryField::Varint(t, v)),
            1 => (3u32..6).prop_map(EntryField::Fixed32),
            1 => (1u32..4).prop_map(EntryField::Overrun),
            1 => (1u32..3).prop_map(EntryField::WrongType),
        ]
    }

    fn encode_entry(fields: &[EntryField]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in fields {
            match f {
                EntryField::Text(tag, bytes) => {
                    encoding::encode_key(*tag, WireType::LengthDelimited, &mut out);
                    encoding::encode_varint(bytes.len() as u64, &mut out);
                    out.extend_from_slice(bytes);
                }
                EntryField::Varint(tag, v) => {
                    encoding::encode_key(*tag, WireType::Varint, &mut out);
                    encoding::encode_varint(*v, &mut out);
                }
                EntryField::Fixed32(tag) => {
                    encoding::encode_key(*tag, WireType::ThirtyTwoBit, &mut out);
                    out.extend_from_slice(&[1, 2, 3, 4]);
                }
                EntryField::Overrun(tag) => {
                    encoding::encode_key(*tag, WireType::LengthDelimited, &mut out);
                    encoding::encode_varint(50, &mut out);
                    out.extend_from_slice(b"short");
                }
                EntryField::WrongType(tag) => {
                    encoding::encode_key(*tag, WireType::Varint, &mut out);
                    encoding::encode_varint(7, &mut out);
                }
            }
        }
        out
    }

    proptest! {
        /// Header entries as any sender may write them (fields in any order,
        /// repeated, missing, unknown, malformed, not UTF-8): warden's
        /// reader refuses exactly the messages the official decoder refuses,
        /// and reads the same map from the others.
        #[test]
        fn header_entries_read_as_the_official_decoder_reads_them(
            entries in proptest::collection::vec(
                proptest::collection::vec(entry_field(), 0..5), 0..6),
        ) {
            let mut wire = Vec::new();
            for entry in &entries {
                let bytes = encode_entry(entry);
                encoding::encode_key(3, WireType::LengthDelimited, &mut wire);
                encoding::encode_varint(bytes.len() as u64, &mut wire);
                wire.extend_from_slice(&bytes);
            }
            let official = auth::attribute_context::HttpRequest::decode(wire.as_slice());
            let read = HttpRequest::decode(Bytes::from(wire.clone()));
            prop_assert_eq!(official.is_ok(), read.is_ok(), "{:?} / {:?}", official, read);
            if let (Ok(official), Ok(read)) = (official, read) {
                let mut map = HashMap::new();
                for (k, v) in read.headers.iter() {
                    map.insert(k.to_owned(), v.to_owned());
                }
                prop_assert_eq!(&map, &official.headers);
                for (k, v) in &official.headers {
                    prop_assert_eq!(Headers::get(&read.headers, k), Some(v.as_str()));
                }
                // Read from a slice as from `Bytes`: the same.
                let again = HttpRequest::decode(wire.as_slice()).unwrap();
                prop_assert_eq!(again, read);
            }
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
        let mut sent = HttpRequest::default();
        sent.headers.push("x-nonce", "first");
        sent.headers.push("x-nonce", "last");
        let wire = sent.encode_to_vec();
        let official = auth::attribute_context::HttpRequest::decode(wire.as_slice()).unwrap();
        let read = HttpRequest::decode(wire.as_slice()).unwrap();
        assert_eq!(official.headers["x-nonce"], "last");
        assert_eq!(Headers::get(&read.headers, "x-nonce"), Some("last"));
        assert!(Headers::present(&read.headers, "x-nonce"));
    }
}
