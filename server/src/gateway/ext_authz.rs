//! Envoy external authorization: `envoy.service.auth.v3.Authorization/Check`
//! on the gRPC port, so Envoy's `ext_authz` HTTP filter (and Istio, Contour,
//! Gloo, Emissary, built on it) asks warden about every request.
//!
//! From `attributes.request.http` warden takes the method, the path and
//! query, the signing headers or a bearer key, and the body when Envoy sends
//! it (`with_request_body`, as text or `pack_as_bytes`). The principal Envoy
//! verified for the downstream connection (`attributes.source.principal`)
//! becomes the forwarded client identity when the calling Envoy's
//! certificate holds the `forward-identity` role, and is ignored otherwise.
//!
//! Allowed: OK, with `x-warden-key-id` / `x-warden-owner` for the upstream,
//! the signing headers (and a bearer key's `Authorization`) removed, and the
//! `RateLimit-*` headers for the client. Denied: PERMISSION_DENIED with
//! warden's HTTP status, `Retry-After`, `RateLimit-*` and the Django
//! middleware's JSON body. When warden cannot decide, the call fails
//! (UNAVAILABLE, RESOURCE_EXHAUSTED): Envoy then applies its own
//! `failure_mode_allow` and `status_on_error`.

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::Authorization;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use std::borrow::Cow;
use std::collections::HashMap;
use tonic::{Request, Response, Status};

use super::{Body, Early, Headers, HttpAnswer, Original, SIGNING_HEADERS, envoy_request};
use crate::auth::{Authz, Role};
use crate::config::GatewaySettings;
use crate::service::unary::UnaryMethod;
use crate::service::warden::WardenService;
use crate::service::{Admission, CallMetrics, Face, caller_of};

/// gRPC status codes in `CheckResponse.status`.
const OK: i32 = 0;
const PERMISSION_DENIED: i32 = 7;

/// Answers Envoy's `ext_authz` filter with the `Check` pipeline.
#[derive(Debug, Clone)]
pub struct ExtAuthz {
    checks: WardenService,
    gateway: GatewaySettings,
    authz: Authz,
    admission: Admission,
}

impl ExtAuthz {
    pub fn new(
        checks: WardenService,
        gateway: GatewaySettings,
        authz: Authz,
        admission: Admission,
    ) -> Self {
        Self {
            checks,
            gateway,
            authz,
            admission,
        }
    }
}

/// Envoy's `Check`, read (only what warden uses of it, see
/// [`envoy_request`]) and answered by
/// [`Unary`](crate::service::unary::Unary).
impl UnaryMethod for ExtAuthz {
    type Request = envoy_request::CheckRequest;
    type Response = CheckResponse;
    const PATH: &'static str = "/envoy.service.auth.v3.Authorization/Check";

    /// A message the official decoder would refuse for what warden reads
    /// of it goes to the generated service, to be refused as it always
    /// was: the text fields read as `String`s are checked by this decoder
    /// too, and the body, read as bytes, is checked here.
    fn decode(message: bytes::Bytes) -> Option<envoy_request::CheckRequest> {
        let request = envoy_request::CheckRequest::decode(message).ok()?;
        let http = request
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        http.is_none_or(envoy_request::HttpRequest::text_is_utf8)
            .then_some(request)
    }

    fn answer(
        &self,
        request: Request<envoy_request::CheckRequest>,
    ) -> impl Future<Output = Result<Response<CheckResponse>, Status>> + Send {
        self.authorize(request)
    }
}

/// What the generated service answers: only calls [`Unary`] hands it, the
/// ones it does not read itself. One that decodes is answered as any other,
/// read again as warden reads it.
///
/// [`Unary`]: crate::service::unary::Unary
#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let encoded = request.get_ref().encode_to_vec();
        let read = envoy_request::CheckRequest::decode(encoded.as_slice())
            .map_err(|_| Status::invalid_argument("the CheckRequest cannot be read"))?;
        self.authorize(request.map(|_| read)).await
    }
}

impl ExtAuthz {
    /// One ext_authz call, however it was read: the original request taken
    /// from Envoy's attributes, checked as `Check` checks it, and answered
    /// as Envoy's filter reads an answer.
    async fn authorize(
        &self,
        request: Request<envoy_request::CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let _permit = self.admission.admit(&request)?;
        let caller = caller_of(&request);
        let attributes = request.into_inner().attributes.unwrap_or_default();
        let http = attributes
            .request
            .as_ref()
            .and_then(|r| r.http.as_ref())
            .ok_or_else(|| {
                Status::invalid_argument("attributes.request.http: missing (not an HTTP request)")
            })?;
        let source = attributes.source.as_ref();
        let source_address = source
            .and_then(|s| s.address.as_ref())
            .and_then(|a| a.socket_address.as_ref())
            .map(|s| s.address.as_str());
        let headers = request_headers(http);
        let original = Original {
            method: &http.method,
            uri: &http.path,
            headers: headers.as_ref(),
            body: body(http, &headers),
            source_address,
        };
        let mut req = match super::check_request(&original, &self.gateway) {
            Ok(req) => req,
            Err(early) => {
                if let Early::Misconfigured(why) = &early {
                    tracing::warn!(
                        event = "ext_authz_misconfigured",
                        why,
                        "an ext_authz request lacks what Envoy must send"
                    );
                }
                return Ok(Response::new(denied(super::early_answer(&early))));
            }
        };
        if let Some(principal) = source
            .map(|s| s.principal.as_str())
            .filter(|p| !p.is_empty())
            && self
                .authz
                .grant(caller.0.as_deref())
                .has(Role::ForwardIdentity)
        {
            req.client_identity = principal.to_owned();
        }
        req.request_id = loggable_request_id(&http.id);
        let bearer = !req.api_key.is_empty();
        let response = match self.checks.check_as(req, &caller).await {
            Ok(response) => response,
            // Full state (the replay memory, a rate-limit pool) is warden's
            // own refusal, answered as a denial: as a failed call, Envoy's
            // `failure_mode_allow` would let through unchecked exactly what
            // an attacker who filled that state wants let through.
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                return Ok(Response::new(denied(super::cannot_check_now())));
            }
            Err(status) => return Err(status),
        };
        let answer = super::answer(response);
        CallMetrics::get().gateway_answered(Face::ExtAuthz, answer.allowed());
        Ok(Response::new(if answer.allowed() {
            ok(answer, bearer)
        } else {
            denied(answer)
        }))
    }
}

/// Envoy's request headers: the map as sent, or one built from
/// `header_map` when Envoy is set to `encode_raw_headers` (repeated names
/// joined as HTTP joins them).
fn request_headers(http: &envoy_request::HttpRequest) -> Cow<'_, envoy_request::HeaderList> {
    if !http.headers.is_empty() {
        return Cow::Borrowed(&http.headers);
    }
    let mut joined: Vec<(String, String)> = Vec::new();
    // Where each name is in `joined`: a caller may send many lines.
    let mut at: HashMap<String, usize> = HashMap::new();
    for h in http.header_map.iter().flat_map(|m| &m.headers) {
        let value = if h.raw_value.is_empty() {
            h.value.clone()
        } else {
            String::from_utf8_lossy(&h.raw_value).into_owned()
        };
        let key = h.key.to_ascii_lowercase();
        match at.get(&key) {
            Some(&i) => {
                joined[i].1.push(',');
                joined[i].1.push_str(&value);
            }
            None => {
                at.insert(key.clone(), joined.len());
                joined.push((key, value));
            }
        }
    }
    let mut out = envoy_request::HeaderList::default();
    for (key, value) in &joined {
        out.push(key, value);
    }
    Cow::Owned(out)
}

/// The body Envoy sent, or why there is none to verify.
fn body(http: &envoy_request::HttpRequest, headers: &envoy_request::HeaderList) -> Body {
    // Envoy marks a body it cut at max_request_bytes.
    if Headers::get(headers, "x-envoy-auth-partial-body") == Some("true") {
        return Body::Withheld;
    }
    if !http.raw_body.is_empty() {
        return Body::Sent(http.raw_body.clone());
    }
    if !http.body.is_empty() {
        return Body::Sent(http.body.clone());
    }
    let declared = Headers::get(headers, "content-length")
        .and_then(|l| l.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if declared > 0 || http.size > 0 || headers.present("transfer-encoding") {
        Body::Withheld
    } else {
        Body::Sent(bytes::Bytes::new())
    }
}

/// A header that replaces any of the same name: the upstream must see
/// warden's `x-warden-key-id`, never one the client sent beside it, and the
/// client warden's `RateLimit`. Said explicitly: the field's default
/// (`APPEND_IF_EXISTS_OR_ADD`) appends, and Envoy versions differ in which
/// of `append` and `append_action` they read when neither is set; all read
/// `append_action` when it is, or take an unset `append` as "replace".
fn header(name: impl Into<String>, value: impl Into<String>) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: name.into(),
            value: value.into(),
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

fn ok(answer: HttpAnswer, bearer: bool) -> CheckResponse {
    let (key_id, owner) = answer.caller.unwrap_or_default();
    let mut remove: Vec<String> = SIGNING_HEADERS.iter().map(|h| (*h).to_owned()).collect();
    if bearer {
        remove.push("authorization".to_owned());
    }
    CheckResponse {
        status: Some(RpcStatus {
            code: OK,
            ..Default::default()
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers: vec![
                header("x-warden-key-id", key_id),
                header("x-warden-owner", owner),
            ],
            headers_to_remove: remove,
            response_headers_to_add: answer
                .headers
                .into_iter()
                .map(|(n, v)| header(n, v))
                .collect(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn denied(answer: HttpAnswer) -> CheckResponse {
    let mut headers: Vec<HeaderValueOption> = Vec::with_capacity(answer.headers.len() + 1);
    headers.extend(answer.headers.into_iter().map(|(n, v)| header(n, v)));
    headers.push(header("content-type", "application/json"));
    CheckResponse {
        status: Some(RpcStatus {
            code: PERMISSION_DENIED,
            ..Default::default()
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(answer.status),
            }),
            headers,
            body: answer.body.unwrap_or_default(),
        })),
        ..Default::default()
    }
}

/// Envoy's `x-request-id`, for correlating warden's log lines, if it fits
/// a request id (printable ASCII, at most 128 characters).
fn loggable_request_id(id: &str) -> String {
    if crate::check::is_valid_request_id(id) {
        id.to_owned()
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_body(body: &[u8]) -> bytes::Bytes {
        envoy_request::CheckRequest {
            attributes: Some(envoy_request::AttributeContext {
                request: Some(envoy_request::Request {
                    http: Some(envoy_request::HttpRequest {
                        method: "POST".to_owned(),
                        body: bytes::Bytes::copy_from_slice(body),
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }),
        }
        .encode_to_vec()
        .into()
    }

    /// `body` is a `string`: one that is not UTF-8 is not read here but
    /// handed to the generated service, whose decoder refuses it, as it
    /// refused it before warden read the message itself.
    #[test]
    fn a_body_that_is_not_utf8_is_refused_as_the_official_decoder_refuses_it() {
        let bad = with_body(&[b'{', 0xff, 0xfe, b'}']);
        assert!(<ExtAuthz as UnaryMethod>::decode(bad.clone()).is_none());
        assert!(CheckRequest::decode(bad).is_err());

        let good = with_body("{\"total\": \"12 €\"}".as_bytes());
        let read = <ExtAuthz as UnaryMethod>::decode(good.clone()).unwrap();
        let http = read.attributes.unwrap().request.unwrap().http.unwrap();
        assert_eq!(&http.body[..], "{\"total\": \"12 €\"}".as_bytes());
        assert!(CheckRequest::decode(good).is_ok());
    }

    /// So is a header whose name or value is not UTF-8 (`map<string,
    /// string>`).
    #[test]
    fn a_header_that_is_not_utf8_is_refused_as_the_official_decoder_refuses_it() {
        // Length-delimited fields, nested as Envoy nests them:
        // CheckRequest.attributes(1).request(4).http(2).headers(3).
        fn field(tag: u32, inner: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            prost::encoding::bytes::encode(tag, &inner.to_vec(), &mut out);
            out
        }
        for (key, value) in [
            (&b"x-nonce"[..], &b"n\xff"[..]),
            (&b"x-\xc3"[..], &b"1"[..]),
        ] {
            let entry = [field(1, key), field(2, value)].concat();
            let bad = field(1, &field(4, &field(2, &field(3, &entry))));
            assert!(<ExtAuthz as UnaryMethod>::decode(bad.clone().into()).is_none());
            assert!(CheckRequest::decode(bad.as_slice()).is_err());
        }
        let entry = [field(1, b"x-nonce"), field(2, b"n-1")].concat();
        let good = field(1, &field(4, &field(2, &field(3, &entry))));
        let read = <ExtAuthz as UnaryMethod>::decode(good.into()).unwrap();
        let http = read.attributes.unwrap().request.unwrap().http.unwrap();
        assert_eq!(Headers::get(&http.headers, "x-nonce"), Some("n-1"));
    }

    /// A message without the HTTP request is read, and answered by warden
    /// as it always was (INVALID_ARGUMENT, see `authorize`).
    #[test]
    fn a_message_without_its_http_request_is_read() {
        assert!(<ExtAuthz as UnaryMethod>::decode(bytes::Bytes::new()).is_some());
    }
}
