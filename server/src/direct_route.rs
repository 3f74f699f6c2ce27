//! The services every request of a gateway or an app calls (`Check`, Envoy's
//! ext_authz and rate limit service) are reached without tonic's router.
//!
//! tonic routes by path through an axum `Router`: per call it matches the
//! path, boxes the request and response bodies twice over (tonic's body into
//! axum's and back) and boxes the route's future. On a unary `Check`, whose
//! own work is about 2 µs, that is measurable: `Direct` looks at the path
//! prefix itself and calls the service, and leaves every other service
//! (admin, health, reflection, peer) to the router as before.

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures_util::future::Either;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http::{Request, Response};
use tonic::server::NamedService;

/// Sends calls to `S`'s gRPC service name straight to it (when there is
/// one: an optional service that is off leaves its path to the router,
/// which answers UNIMPLEMENTED), and every other call to `R`: the router,
/// or another `Direct` in front of it.
#[derive(Clone, Debug)]
pub struct Direct<S, R> {
    service: Option<S>,
    routes: R,
}

impl<S, R> Direct<S, R> {
    pub fn new(service: S, routes: R) -> Self {
        Self::optional(Some(service), routes)
    }

    pub fn optional(service: Option<S>, routes: R) -> Self {
        Self { service, routes }
    }
}

/// Whether `path` names a method of the gRPC service `name`
/// (`/<name>/<method>`), as the router's `/<name>/{*rest}` matches it.
fn is_call_to(path: &str, name: &str) -> bool {
    path.strip_prefix('/')
        .and_then(|p| p.strip_prefix(name))
        .is_some_and(|rest| rest.starts_with('/'))
}

impl<S, R> Service<Request<Body>> for Direct<S, R>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + NamedService,
    R: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<S::Future, R::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Both are always ready (tonic's generated servers and axum's
        // router); asked anyway, as the contract wants.
        if let Some(service) = &mut self.service
            && service.poll_ready(cx).is_pending()
        {
            return Poll::Pending;
        }
        self.routes.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        match &mut self.service {
            Some(service) if is_call_to(request.uri().path(), S::NAME) => {
                Either::Left(service.call(request))
            }
            _ => Either::Right(self.routes.call(request)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_call_to;

    #[test]
    fn only_the_services_own_paths_are_taken_past_the_router() {
        assert!(is_call_to("/warden.v1.Warden/Check", "warden.v1.Warden"));
        assert!(is_call_to("/warden.v1.Warden/", "warden.v1.Warden"));
        // A service whose name starts with this one's, and near misses.
        assert!(!is_call_to(
            "/warden.v1.WardenAdmin/Check",
            "warden.v1.Warden"
        ));
        assert!(!is_call_to("/warden.v1.Warden", "warden.v1.Warden"));
        assert!(!is_call_to("warden.v1.Warden/Check", "warden.v1.Warden"));
        assert!(!is_call_to("/warden.v1.Admin/Check", "warden.v1.Warden"));
        assert!(!is_call_to("/", "warden.v1.Warden"));
    }
}
