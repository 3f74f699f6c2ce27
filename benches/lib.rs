//! Benchmarks of warden: see `engine.rs` (criterion). This library is empty;
//! it only gives the bench targets a package.
