//! Cross-resource checks (placeholder, filled below).
