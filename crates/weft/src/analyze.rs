//! `weft analyze`: parse errors with file, line and field, then Istio-style coded
//! cross-resource messages; exit 79 when anything reaches the failure threshold.
//! Offline it reads `-f` files; `--live` asks the running control plane, which checks its
//! resources (with the `-f` files laid over them) against its registered workloads.

use std::path::PathBuf;

use anyhow::bail;
use weft_api::analyze::{self as an, Level};

use crate::ops::{call, files_text};

fn level(s: &str) -> Level {
    match s {
        "info" => Level::Info,
        "warning" => Level::Warning,
        _ => Level::Error,
    }
}

/// Analyzes files alone. Parse errors count as errors (the resource is unusable).
pub fn offline(files: &[PathBuf], failure: &str, output: &str) -> i32 {
    let mut parsed = weft_api::Parsed::default();
    for f in files {
        parsed.extend(if f.is_dir() { weft_api::parse_dir(f) } else { weft_api::parse_file(f) });
    }
    for e in &parsed.errors {
        println!("Error [parse] {e}");
    }
    let messages = an::analyze(&parsed.resources);
    let unapplied = an::unapplied_kinds(&parsed.skipped);
    let shown = level(output);
    for m in unapplied.iter().filter(|m| m.level >= shown) {
        println!("{m}");
    }
    for m in messages.iter().filter(|m| m.level >= shown) {
        println!("{m}");
    }
    let failing = level(failure);
    if !parsed.errors.is_empty() && Level::Error >= failing {
        return an::EXIT_ISSUES_FOUND;
    }
    if unapplied.iter().any(|m| m.level >= failing) {
        return an::EXIT_ISSUES_FOUND;
    }
    if messages.is_empty() && unapplied.is_empty() && parsed.errors.is_empty() {
        eprintln!("\u{2714} No validation issues found when analyzing {} resource(s).", parsed.resources.len());
    }
    an::exit_code(&messages, failing)
}

/// Analyzes the control plane's live state (`POST /api/v1/analyze`).
pub async fn live(server: &str, files: &[PathBuf], failure: &str, output: &str) -> anyhow::Result<i32> {
    let body: Vec<serde_json::Value> = files_text(files)?
        .into_iter()
        .map(|(path, text)| serde_json::json!({"name": path.display().to_string(), "text": text}))
        .collect();
    let (status, v) = call(server, "POST", "/api/v1/analyze", Some(serde_json::Value::Array(body).to_string())).await?;
    if status != 200 {
        bail!("{}", v["error"].as_str().unwrap_or("the control plane refused the analysis"));
    }
    let errors: Vec<&str> = v["errors"].as_array().into_iter().flatten().filter_map(|e| e.as_str()).collect();
    for e in &errors {
        println!("Error [parse] {e}");
    }
    let shown = level(output);
    let failing = level(failure);
    let mut worst = None;
    for m in v["messages"].as_array().into_iter().flatten() {
        let l = level(&m["level"].as_str().unwrap_or("error").to_ascii_lowercase());
        worst = worst.max(Some(l));
        if l >= shown {
            println!("{}", m["text"].as_str().unwrap_or_default());
        }
    }
    if worst.is_none() && errors.is_empty() {
        eprintln!(
            "\u{2714} No validation issues found when analyzing {} resource(s) and {} workload(s) live.",
            v["resources"], v["workloads"]
        );
    }
    let fails = (!errors.is_empty() && Level::Error >= failing) || worst.is_some_and(|w| w >= failing);
    Ok(if fails { an::EXIT_ISSUES_FOUND } else { 0 })
}
