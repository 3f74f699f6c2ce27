//! Pipeline tests with an injected clock.
