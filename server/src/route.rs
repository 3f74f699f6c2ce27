//! Routes, and how a request's path is read for them: which routes a key
//! or an end client may call ([`Route::allows`]) and which route limits
//! count a request ([`Route::counts`]). A path is judged as the application
//! behind the gateway may read it ([`ServedPath`]), never as the client
//! spelled it, and paths whose meaning depends on who resolves them are
//! refused before anything is looked up ([`has_dot_segment`]).

use std::borrow::Cow;
use std::fmt;

use warden_client::signing::percent_decoded;

/// A route a key may call: a method (or any) and a path (exact, or a prefix
/// when written with a trailing `*`), matched against a request's
/// [`ServedPath`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    method: Option<String>,
    /// As written, for display.
    path: String,
    /// As the application reads it, for matching.
    served: Vec<u8>,
    prefix: bool,
}

impl Route {
    /// Parses "POST /webhooks/billing", "GET /v1/*" or "* /health".
    pub fn parse(text: &str) -> Result<Self, String> {
        let route = Self::parse_stored(text)?;
        if has_dot_segment(&route.path) {
            return Err(format!(
                "{text:?}: the path must not have '.' or '..' segments (requests with them are refused)"
            ));
        }
        if route.served.iter().any(|&b| b == b';' || b == b'\\') {
            return Err(format!(
                "{text:?}: the path must not have ';' or '\\' (servers read them in different ways)"
            ));
        }
        Ok(route)
    }

    /// Like [`Self::parse`], for a route a key was stored with: one stored
    /// before dot segments were refused still loads (a store that did not
    /// load would keep the server, and with it the admin API that could
    /// mend the key, from starting). It can match no request, since every
    /// request with a dot segment is refused.
    pub fn parse_stored(text: &str) -> Result<Self, String> {
        let (method, path) = text
            .trim()
            .split_once(' ')
            .ok_or_else(|| format!("{text:?} is not \"METHOD /path\""))?;
        let path = path.trim();
        if !path.starts_with('/') {
            return Err(format!("{text:?}: the path must start with '/'"));
        }
        let method = match method {
            "*" => None,
            m if !m.is_empty() && m.bytes().all(|b| b.is_ascii_alphabetic()) => {
                Some(m.to_ascii_uppercase())
            }
            _ => return Err(format!("{text:?}: the method must be letters or '*'")),
        };
        let (path, prefix) = match path.strip_suffix('*') {
            Some(p) => (p.to_owned(), true),
            None => (path.to_owned(), false),
        };
        Ok(Self {
            method,
            served: ServedPath::of(&path).kept.into_owned(),
            path,
            prefix,
        })
    }

    /// Whether a key or client limited to this route may make a request
    /// with this method (in any case: HTTP methods are compared as the
    /// gateway sent them, without a copy) and path: under every reading of
    /// the path, since warden cannot know which the application makes.
    pub fn allows(&self, method: &str, path: &ServedPath<'_>) -> bool {
        self.method_matches(method) && path.readings().all(|p| self.path_matches(p))
    }

    /// Whether a limit on this route counts a request: under any reading of
    /// its path, and with or without a trailing slash (Spring before 6 and
    /// Express serve `/login/` as `/login`), so that no spelling the
    /// application serves as this route escapes the count. A limit on `GET`
    /// counts `HEAD` too: frameworks (Django, Flask, Rails, Spring) run the
    /// `GET` handler for it, all its work but the body sent.
    pub fn counts(&self, method: &str, path: &ServedPath<'_>) -> bool {
        let route = without_trailing_slash(&self.served);
        let method_counts = self.method_matches(method)
            || (method.eq_ignore_ascii_case("HEAD") && self.method.as_deref() == Some("GET"));
        method_counts
            && path
                .readings()
                .any(|p| self.path_matches(p) || without_trailing_slash(p) == route)
    }

    fn method_matches(&self, method: &str) -> bool {
        self.method
            .as_deref()
            .is_none_or(|m| m.eq_ignore_ascii_case(method))
    }

    fn path_matches(&self, path: &[u8]) -> bool {
        if self.prefix {
            path.starts_with(&self.served)
        } else {
            *path == *self.served
        }
    }
}

/// A request path as the application behind the gateway reads it:
/// percent-decoded (as WSGI servers and most frameworks decode it, `%2F`
/// included), with runs of slashes merged (as nginx and Envoy's
/// `merge_slashes` do). Which routes a key or client may call, and which
/// route limits count a request, are decided on this form, never on the
/// client's spelling: `/v1/%6Cogin` and `//v1/login` are the application's
/// `/v1/login`, and a limit on it must count them. Paths whose meaning
/// depends on who resolves them (dot segments, see [`has_dot_segment`])
/// never get this far. Signatures still cover the path exactly as sent.
///
/// A path with a `;` or a `\` has more than one reading. Servlet containers
/// (Tomcat, Jetty, Spring Boot's embedded servers) drop each segment's path
/// parameters, so `/v1/orders;x` is their `/v1/orders`; Windows servers,
/// and Tomcat when told to, read `\` as `/`; most applications keep both as
/// they are. warden cannot know which reading the application makes, so a
/// route rule must hold for every one ([`Route::allows`]) and a route limit
/// counts a request under any ([`Route::counts`]).
#[derive(Debug)]
pub struct ServedPath<'a> {
    kept: Cow<'a, [u8]>,
    /// The other readings, only for a path with a `;` or a `\`.
    others: Vec<Vec<u8>>,
}

impl<'a> ServedPath<'a> {
    pub fn of(path: &'a str) -> Self {
        if !path.contains(['%', ';', '\\']) && !path.contains("//") {
            return Self {
                kept: path.as_bytes().into(),
                others: Vec::new(),
            };
        }
        let kept = merged_slashes(percent_decoded(path));
        let mut others: Vec<Vec<u8>> = Vec::new();
        if kept.contains(&b';') || kept.contains(&b'\\') {
            for (drop_parameters, backslash_separates) in
                [(true, false), (false, true), (true, true)]
            {
                let reading = read_as(path, drop_parameters, backslash_separates);
                if reading != kept && !others.contains(&reading) {
                    others.push(reading);
                }
            }
        }
        Self {
            kept: kept.into(),
            others,
        }
    }

    /// Every way the application may read the path.
    pub fn readings(&self) -> impl Iterator<Item = &[u8]> {
        std::iter::once(&*self.kept).chain(self.others.iter().map(Vec::as_slice))
    }
}

/// `path` as a server that drops path parameters (from a `;` to the next
/// `/`, before decoding, as servlet containers do), reads `\` as `/`, or
/// both, reads it.
fn read_as(path: &str, drop_parameters: bool, backslash_separates: bool) -> Vec<u8> {
    let mut in_parameter = false;
    let kept = path.chars().filter(|&c| {
        in_parameter = match c {
            '/' => false,
            ';' => drop_parameters,
            _ => in_parameter,
        };
        !in_parameter
    });
    let path: String = kept.collect();
    merged_slashes(percent_decoded(&path).map(|b| match b {
        b'\\' if backslash_separates => b'/',
        b => b,
    }))
}

fn without_trailing_slash(path: &[u8]) -> &[u8] {
    match path {
        [rest @ .., b'/'] if !rest.is_empty() => rest,
        _ => path,
    }
}

fn merged_slashes(bytes: impl Iterator<Item = u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.size_hint().0);
    for b in bytes {
        if !(b == b'/' && out.last() == Some(&b'/')) {
            out.push(b);
        }
    }
    out
}

/// Whether `path` has a `.` or `..` segment, however written: plain or
/// percent-encoded, between slashes, encoded slashes or backslashes (some
/// servers read `\` as `/`), or followed by a path parameter (`..;x`, which
/// servlet containers read as `..`). What such a path names depends on who
/// resolves it: a proxy that decodes `%2F` before removing dot segments
/// reads `/webhooks/x%2F..%2F..%2Fadmin` as `/admin`, and Tomcat reads
/// `/webhooks/x/..;/admin` so, where a route check on the path as sent sees
/// a path under `/webhooks/`. Browsers and HTTP libraries remove dot
/// segments before sending (RFC 3986, 5.2.4), so a request that still has
/// one is refused rather than guessed at.
pub fn has_dot_segment(path: &str) -> bool {
    if !path.contains(['.', '%']) {
        return false;
    }
    // The current segment up to any `;`: its length, whether it is all
    // dots, and whether a `;` has ended it.
    let (mut len, mut dots, mut in_parameter) = (0usize, true, false);
    for b in percent_decoded(path).chain([b'/']) {
        if b == b'/' || b == b'\\' {
            if dots && (1..=2).contains(&len) {
                return true;
            }
            (len, dots, in_parameter) = (0, true, false);
        } else if b == b';' || in_parameter {
            in_parameter = true;
        } else {
            len += 1;
            dots &= b == b'.';
        }
    }
    false
}

/// Written as parsed: "POST /login", "* /v1/*".
impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let star = if self.prefix { "*" } else { "" };
        write!(
            f,
            "{} {}{star}",
            self.method.as_deref().unwrap_or("*"),
            self.path
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(path: &str) -> String {
        String::from_utf8(ServedPath::of(path).kept.into_owned()).unwrap()
    }

    #[test]
    fn a_path_is_matched_as_the_application_reads_it() {
        assert_eq!(served("/v1/orders"), "/v1/orders");
        assert_eq!(served("/v1/%6Frders"), "/v1/orders");
        assert_eq!(served("/v1/%6frders"), "/v1/orders");
        assert_eq!(served("//v1///orders/"), "/v1/orders/");
        assert_eq!(served("/a%2Fb"), "/a/b");
        assert_eq!(served("/a%2F%2Fb"), "/a/b");
        // A `%` that starts no escape stands for itself.
        assert_eq!(served("/100%/x%4"), "/100%/x%4");
        assert_eq!(served("/%zz"), "/%zz");
    }

    #[test]
    fn a_dot_segment_is_found_however_it_is_written() {
        for path in [
            "/..",
            "/.",
            "/a/../b",
            "/a/./b",
            "/a/..",
            "/a/.",
            "/a/%2e%2e/b",
            "/a/%2E./b",
            "/a/.%2e",
            "/a%2F..%2Fb",
            "/a%2f.%2fb",
            "/a\\..\\b",
            "/a%5C..%5Cb",
            "/a%5c.",
            // Servlet containers drop a segment's parameters first.
            "/a/..;/b",
            "/a/..;jsessionid=1/b",
            "/a/.;x",
            "/a/%2e%2e;/b",
            "/a/..%3B/b",
            "/a\\..;x\\b",
        ] {
            assert!(has_dot_segment(path), "{path}");
        }
        for path in [
            "/",
            "/a/b",
            "/a/.b",
            "/a/b.",
            "/a/...",
            "/a/..b/c",
            "/files/report.v2.pdf",
            "/a/%2e%2e%2e",
            "/a%2Fb",
            // Decoded once, as a server decodes: `%252e` is the text `%2e`.
            "/a/%252e%252e/b",
            "/a;x/b",
            "/a/;../b",
            "/a/...;/b",
            "/a/..b;x",
        ] {
            assert!(!has_dot_segment(path), "{path}");
        }
    }

    #[test]
    fn a_path_parameter_or_a_backslash_gives_a_path_more_readings() {
        let readings = |path: &str| -> Vec<String> {
            ServedPath::of(path)
                .readings()
                .map(|r| String::from_utf8(r.to_vec()).unwrap())
                .collect()
        };
        assert_eq!(readings("/v1/orders"), ["/v1/orders"]);
        assert_eq!(readings("/v1/%6Frders"), ["/v1/orders"]);
        assert_eq!(
            readings("/v1/orders;jsessionid=1"),
            ["/v1/orders;jsessionid=1", "/v1/orders"]
        );
        assert_eq!(readings("/v1;x/orders"), ["/v1;x/orders", "/v1/orders"]);
        assert_eq!(readings("/;x/admin"), ["/;x/admin", "/admin"]);
        assert_eq!(readings("/v1\\orders"), ["/v1\\orders", "/v1/orders"]);
        // Parameters are dropped up to the next `/` as sent, before `\` is
        // read as one (as Tomcat does).
        assert_eq!(
            readings("/v1/orders;x\\y"),
            ["/v1/orders;x\\y", "/v1/orders", "/v1/orders;x/y"]
        );

        // A rule holds for every reading, a limit counts any.
        let route = Route::parse("POST /v1/orders").unwrap();
        for path in ["/v1/orders;x", "/v1\\orders", "/v1;x/orders"] {
            let path = ServedPath::of(path);
            assert!(!route.allows("POST", &path), "{path:?}");
            assert!(route.counts("POST", &path), "{path:?}");
        }
        // With or without a trailing slash, for a limit only.
        assert!(route.counts("POST", &ServedPath::of("/v1/orders/")));
        assert!(!route.allows("POST", &ServedPath::of("/v1/orders/")));
        let prefix = Route::parse("POST /v1/*").unwrap();
        assert!(prefix.counts("POST", &ServedPath::of("/v1")));
        assert!(!prefix.counts("POST", &ServedPath::of("/v2")));
        assert!(!route.counts("POST", &ServedPath::of("/v1/orders/x")));
        assert!(!route.counts("GET", &ServedPath::of("/v1/orders")));
        // A limit on GET counts HEAD, which runs the same handler.
        let get = Route::parse("GET /v1/orders").unwrap();
        assert!(get.counts("HEAD", &ServedPath::of("/v1/orders")));
        assert!(get.counts("head", &ServedPath::of("/v1/orders")));
        assert!(!get.allows("HEAD", &ServedPath::of("/v1/orders")));
        assert!(!route.counts("HEAD", &ServedPath::of("/v1/orders")));

        // A route itself must have one reading.
        assert!(Route::parse("POST /v1/orders;x").is_err());
        assert!(Route::parse("POST /v1/%3B*").is_err());
        assert!(Route::parse("POST /v1\\orders").is_err());
    }

    #[test]
    fn routes_with_dot_segments_are_refused_and_others_are_read_as_served() {
        assert!(Route::parse("GET /v1/../admin").is_err());
        assert!(Route::parse("GET /v1/%2e%2e/*").is_err());
        let route = Route::parse("POST /v1/%6Cogin").unwrap();
        assert!(route.allows("POST", &ServedPath::of("/v1/login")));
        assert_eq!(route.to_string(), "POST /v1/%6Cogin", "shown as written");
        // One stored before they were refused loads, and allows nothing a
        // request can be.
        let stored = Route::parse_stored("GET /v1/../admin*").unwrap();
        for path in ["/admin", "/v1/admin", "/v1/../admin", "/v1/x"] {
            assert!(
                has_dot_segment(path) || !stored.allows("GET", &ServedPath::of(path)),
                "{path}"
            );
        }
    }

    /// How servers behind a gateway may resolve a path: percent-decoded
    /// before or after dot segments are removed, `%2F` decoded or kept,
    /// `\` a separator or a character, path parameters (`;...` up to the
    /// next `/`, before decoding) dropped first as servlet containers do,
    /// or kept. The resolved path is returned as the application then
    /// reads it (decoded, slashes merged).
    fn resolved(
        path: &str,
        decode_slashes_first: bool,
        backslash_separates: bool,
        drop_parameters: bool,
    ) -> String {
        let path = if drop_parameters {
            path.split('/')
                .map(|segment| segment.split(';').next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join("/")
        } else {
            path.to_owned()
        };
        let path = path.as_str();
        let mut text: Vec<u8> = if decode_slashes_first {
            percent_decoded(path).collect()
        } else {
            // Keep encoded slashes and backslashes; decode the rest.
            let kept = path
                .replace("%2F", "\u{1}")
                .replace("%2f", "\u{1}")
                .replace("%5C", "\u{2}")
                .replace("%5c", "\u{2}");
            percent_decoded(&kept).collect()
        };
        if backslash_separates {
            for b in &mut text {
                if *b == b'\\' {
                    *b = b'/';
                }
            }
        }
        let mut segments: Vec<&[u8]> = Vec::new();
        for segment in text.split(|&b| b == b'/') {
            match segment {
                b"" | b"." => {}
                b".." => {
                    segments.pop();
                }
                s => segments.push(s),
            }
        }
        let mut out = String::new();
        for s in segments {
            out.push('/');
            out.push_str(&String::from_utf8_lossy(s));
        }
        let mut out = out.replace('\u{1}', "/").replace('\u{2}', "\\");
        while out.contains("//") {
            out = out.replace("//", "/");
        }
        out
    }

    /// Every way [`resolved`] may resolve `path`.
    fn every_resolution(path: &str) -> Vec<String> {
        let mut all = Vec::new();
        for decode_slashes_first in [true, false] {
            for backslash_separates in [true, false] {
                for drop_parameters in [true, false] {
                    all.push(resolved(
                        path,
                        decode_slashes_first,
                        backslash_separates,
                        drop_parameters,
                    ));
                }
            }
        }
        all
    }

    /// Paths of the pieces attackers use, most of them starting inside
    /// the routes below, as an attack on them does.
    fn any_path() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::strategy::Strategy;
        (
            proptest::sample::select(vec!["/", "/a/", "/a/b", "/a"]),
            proptest::collection::vec(
                proptest::sample::select(vec![
                    "/", "//", "\\", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "a", "b",
                    "%61", "%25", "x", ";", ";x=1", "%3b",
                ]),
                0..10,
            ),
        )
            .prop_map(|(start, parts)| format!("{start}{}", parts.concat()))
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]

        /// The promise route rules rest on: a path warden lets through to a
        /// route check names, for every way a server may resolve it, a
        /// path inside the route it was allowed on.
        #[test]
        fn no_accepted_path_resolves_outside_the_route_it_was_allowed_on(path in any_path()) {
            let route = Route::parse("GET /a/*").unwrap();
            if !has_dot_segment(&path) && route.allows("GET", &ServedPath::of(&path)) {
                for r in every_resolution(&path) {
                    proptest::prop_assert!(
                        format!("{r}/").starts_with("/a/"),
                        "{path} resolves to {r}"
                    );
                }
            }
        }

        /// The promise route limits rest on: a path that some server
        /// resolves to the limited route is counted by its limit.
        #[test]
        fn no_path_a_server_resolves_to_a_limited_route_escapes_its_count(path in any_path()) {
            let route = Route::parse("GET /a/b").unwrap();
            if !has_dot_segment(&path) && every_resolution(&path).iter().any(|r| r == "/a/b") {
                proptest::prop_assert!(
                    route.counts("GET", &ServedPath::of(&path)),
                    "{path} is not counted"
                );
            }
        }
    }
}
