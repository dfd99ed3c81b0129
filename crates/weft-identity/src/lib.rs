//! SPIFFE identities, certificates and rustls configs. Filled in by the identity issue.
