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
use std::borrow::Cow;
use std::collections::HashMap;
use tonic::{Request, Response, Status};

use super::{Body, Early, HttpAnswer, Original, SIGNING_HEADERS};
use crate::auth::{Authz, Role};
use crate::config::GatewaySettings;
use crate::service::unary::UnaryMethod;
use crate::service::warden::WardenService;
use crate::service::{Admission, caller_of};

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

/// Envoy's `Check`, read and answered by [`Unary`](crate::service::unary::Unary).
impl UnaryMethod for ExtAuthz {
    type Request = CheckRequest;
    type Response = CheckResponse;
    const PATH: &'static str = "/envoy.service.auth.v3.Authorization/Check";

    fn answer(
        &self,
        request: Request<CheckRequest>,
    ) -> impl Future<Output = Result<Response<CheckResponse>, Status>> + Send {
        Authorization::check(self, request)
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(
        &self,
        request: Request<CheckRequest>,
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
        let source_address =
            source
                .and_then(|s| s.address.as_ref())
                .and_then(|a| match &a.address {
                    Some(
                        envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(
                            s,
                        ),
                    ) => Some(s.address.as_str()),
                    _ => None,
                });
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
        let answer = super::answer(&response);
        metrics::counter!("warden_gateway_answers_total", "face" => "ext_authz", "allowed" => if answer.allowed() { "true" } else { "false" })
            .increment(1);
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
fn request_headers(
    http: &envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest,
) -> Cow<'_, HashMap<String, String>> {
    if !http.headers.is_empty() {
        return Cow::Borrowed(&http.headers);
    }
    let mut out: HashMap<String, String> = HashMap::new();
    for h in http.header_map.iter().flat_map(|m| &m.headers) {
        let value = if h.raw_value.is_empty() {
            h.value.clone()
        } else {
            String::from_utf8_lossy(&h.raw_value).into_owned()
        };
        out.entry(h.key.to_ascii_lowercase())
            .and_modify(|v| {
                v.push(',');
                v.push_str(&value);
            })
            .or_insert(value);
    }
    Cow::Owned(out)
}

/// The body Envoy sent, or why there is none to verify.
fn body<'a>(
    http: &'a envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest,
    headers: &HashMap<String, String>,
) -> Body<'a> {
    // Envoy marks a body it cut at max_request_bytes.
    if headers.get("x-envoy-auth-partial-body").map(String::as_str) == Some("true") {
        return Body::Withheld;
    }
    if !http.raw_body.is_empty() {
        return Body::Sent(&http.raw_body);
    }
    if !http.body.is_empty() {
        return Body::Sent(http.body.as_bytes());
    }
    let declared = headers
        .get("content-length")
        .and_then(|l| l.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if declared > 0 || http.size > 0 || headers.contains_key("transfer-encoding") {
        Body::Withheld
    } else {
        Body::Sent(&[])
    }
}

/// A header that replaces any of the same name: the upstream must see
/// warden's `x-warden-key-id`, never one the client sent beside it, and the
/// client warden's `RateLimit`. Said explicitly: the field's default
/// (`APPEND_IF_EXISTS_OR_ADD`) appends, and Envoy versions differ in which
/// of `append` and `append_action` they read when neither is set; all read
/// `append_action` when it is, or take an unset `append` as "replace".
fn header(name: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: name.to_owned(),
            value: value.to_owned(),
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
                header("x-warden-key-id", &key_id),
                header("x-warden-owner", &owner),
            ],
            headers_to_remove: remove,
            response_headers_to_add: answer.headers.iter().map(|(n, v)| header(n, v)).collect(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn denied(answer: HttpAnswer) -> CheckResponse {
    let mut headers: Vec<HeaderValueOption> =
        answer.headers.iter().map(|(n, v)| header(n, v)).collect();
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
