//! Test helpers: echo servers, in-process ADS server, real Envoy harness.
