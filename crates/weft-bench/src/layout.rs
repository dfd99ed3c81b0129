//! `weft-bench layout`: the list of functions a sidecar executes, hottest first, for the
//! linker's symbol ordering (`crates/weft-proxy/link/symbol-order.txt`, read by
//! `crates/weft-proxy/build.rs`).
//!
//! Each pair of the outside method runs with both proxies under callgrind from their
//! first instruction (start-up, configuration and certificates included), serves a fixed
//! rate and a short closed loop, and is dumped. Every function of the proxy's own binary
//! that ran is listed with its instructions summed over the pairs; the mangled names are
//! what LLD's `--symbol-ordering-file` matches.
//!
//! A second, native pass samples the same pairs with `perf` at full speed and adds the
//! functions callgrind never saw: code chosen by CPU features that valgrind's virtual CPU
//! lacks (the VAES/AVX2 AES-GCM of `ring`, for one), which is hot in a real sidecar.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context};

use crate::load;
use crate::outside::{start_pair, tools};
use crate::procs::Pinning;
use crate::profile::{callgrind_control, callgrind_wrapper, PerfRecord};

/// What `layout` runs.
#[derive(Clone, Debug, clap::Args)]
pub struct LayoutArgs {
    /// Pairs whose proxies are recorded.
    #[arg(long, value_delimiter = ',', default_value = "weft-h1,weft-h2")]
    pub pairs: Vec<String>,
    /// Requests per second of the fixed-rate part (callgrind is ~20× slower: keep it low).
    #[arg(long, default_value_t = 100)]
    pub rps: u32,
    /// Seconds of the fixed-rate part.
    #[arg(long, default_value_t = 8)]
    pub secs: u64,
    #[arg(long, default_value = "target/release/weft")]
    pub weft: PathBuf,
    /// The build to record: `cargo build --release -p weft-proxy --bin weft-proxy` alone,
    /// as the bench scripts build it. Its symbol names are the ones listed; built together
    /// with `weft`, weft-proxy's dependencies' features are unified with weft's and its
    /// names differ.
    #[arg(long, default_value = "target/release/weft-proxy")]
    pub weft_proxy: PathBuf,
    /// Skip the native `perf` pass.
    #[arg(long)]
    pub no_native: bool,
    /// Where the list goes.
    #[arg(long, default_value = "crates/weft-proxy/link/symbol-order.txt")]
    pub out: PathBuf,
}

/// Records the pairs and writes the ordering list; returns (functions, instructions).
pub async fn layout(args: &LayoutArgs) -> anyhow::Result<(usize, u64)> {
    let scratch = tempfile::Builder::new().prefix("weft-bench-layout-").tempdir()?;
    let (_echo, apps) = crate::run::start_echo(&Pinning { apps: None, proxies: None }, scratch.path()).await?;
    let bin = std::fs::canonicalize(&args.weft_proxy).with_context(|| args.weft_proxy.display().to_string())?;
    let object = bin.file_name().and_then(|f| f.to_str()).unwrap_or("weft-proxy").to_string();
    let mut cost: HashMap<String, u64> = HashMap::new();
    for pair in &args.pairs {
        let dir = scratch.path().join(pair);
        std::fs::create_dir_all(&dir)?;
        let wrapper = callgrind_wrapper(&dir, &bin, "--demangle=no")?;
        let stack = start_pair(pair, &tools(&args.weft, &wrapper, None, None), apps).await?;
        let r = load::h1_fixed_rate(&stack.h1, args.rps, 16, Duration::from_secs(args.secs)).await?;
        load::h1_max(&stack.h1, 16, Duration::from_secs(1)).await?;
        for p in &stack.proxies {
            callgrind_control(&["-d", &p.proc.pid()?.to_string()])?;
        }
        stack.verify(r.ok).await?;
        drop(stack);
        for e in std::fs::read_dir(&dir)? {
            let path = e?.path();
            if path.file_name().and_then(|f| f.to_str()).is_some_and(|f| f.starts_with("cg.")) {
                let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
                for (f, n) in self_costs(&text, &object) {
                    *cost.entry(f).or_default() += n;
                }
            }
        }
        eprintln!("layout: {pair}: {} functions so far", cost.len());
    }
    ensure!(!cost.is_empty(), "no function of {object} was recorded");
    let mut list: Vec<(String, u64)> = cost.into_iter().collect();
    list.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let total = list.iter().map(|l| l.1).sum();
    if !args.no_native {
        let native = native_samples(args, &bin, apps, scratch.path()).await?;
        let seen: std::collections::HashSet<String> = list.iter().map(|l| l.0.clone()).collect();
        let mut extra: Vec<(String, u64)> = native.into_iter().filter(|(f, _)| !seen.contains(f)).collect();
        extra.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        eprintln!("layout: the native pass adds {} functions callgrind did not see", extra.len());
        // Sampled at full speed, so hot: right after callgrind's hottest tenth.
        let at = list.len().div_ceil(10);
        list.splice(at..at, extra);
    }
    let text: String = list.iter().map(|(f, _)| format!("{f}\n")).collect();
    write(&args.out, &text)?;
    Ok((list.len(), total))
}

/// How many of the functions `list` names `binary` has (found, listed): the list's symbol
/// names carry hashes of the build's configuration (profile, dependency versions), so a
/// list from another configuration matches little and its layout gain is lost.
pub fn coverage(binary: &Path, list: &Path) -> anyhow::Result<(usize, usize)> {
    let out = std::process::Command::new("nm").arg("--defined-only").arg(binary).output().context("nm")?;
    ensure!(out.status.success(), "nm {}: {}", binary.display(), String::from_utf8_lossy(&out.stderr));
    let nm = String::from_utf8_lossy(&out.stdout);
    let have: std::collections::HashSet<&str> = nm.lines().filter_map(|l| l.split_whitespace().nth(2)).collect();
    let text = std::fs::read_to_string(list).with_context(|| list.display().to_string())?;
    let listed: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    Ok((listed.iter().filter(|f| have.contains(*f)).count(), listed.len()))
}

/// Samples (leaf function, count) of `bin`'s own code in both proxies of each pair at
/// full speed: a fixed-rate and a closed-loop run under `perf record`.
async fn native_samples(
    args: &LayoutArgs,
    bin: &Path,
    apps: crate::stack::Apps,
    scratch: &Path,
) -> anyhow::Result<HashMap<String, u64>> {
    let mut out: HashMap<String, u64> = HashMap::new();
    for pair in &args.pairs {
        let stack = start_pair(pair, &tools(&args.weft, bin, None, None), apps).await?;
        let data = scratch.join(format!("{pair}.perf"));
        let perf = PerfRecord::start(&stack, &data, &["-F", "9999"]).await?;
        let r = load::h1_fixed_rate(&stack.h1, 1000, 16, Duration::from_secs(args.secs)).await?;
        load::h1_max(&stack.h1, 16, Duration::from_secs(args.secs)).await?;
        perf.stop().await?;
        stack.verify(r.ok).await?;
        drop(stack);
        let script = tokio::process::Command::new("perf")
            .args(["script", "-F", "ip,sym,dso", "--no-demangle", "-i"])
            .arg(&data)
            .output()
            .await?;
        ensure!(script.status.success(), "perf script: {}", String::from_utf8_lossy(&script.stderr));
        for (f, n) in leaf_samples(&String::from_utf8_lossy(&script.stdout), bin) {
            *out.entry(f).or_default() += n;
        }
    }
    Ok(out)
}

/// Counts `perf script -F ip,sym,dso` lines (`ip symbol (dso)`) whose object is `bin`.
pub fn leaf_samples(script: &str, bin: &Path) -> HashMap<String, u64> {
    let dso = format!("({})", bin.display());
    let mut out: HashMap<String, u64> = HashMap::new();
    for line in script.lines() {
        let Some(rest) = line.trim().strip_suffix(&dso) else { continue };
        let Some((_ip, sym)) = rest.trim().split_once(' ') else { continue };
        let sym = sym.trim();
        let sym = sym.rsplit_once("+0x").map_or(sym, |(s, _)| s);
        if !sym.is_empty() && sym != "[unknown]" {
            *out.entry(sym.to_string()).or_default() += 1;
        }
    }
    out
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Self instructions per function of the object whose path ends in `object`, from a
/// callgrind dump (`--dump-instr=no`, names compressed or not). Call lines (`calls=`
/// and the inclusive cost line after it) are not self cost; callgrind's recursion
/// marker (`'2`) is folded into the function.
pub fn self_costs(dump: &str, object: &str) -> HashMap<String, u64> {
    let mut names: HashMap<(char, String), String> = HashMap::new();
    // Resolves "(id) name" / "(id)" / "name" against the compression table of `kind`.
    let mut resolve = |kind: char, v: &str| -> String {
        let v = v.trim();
        if let Some(rest) = v.strip_prefix('(') {
            if let Some((id, name)) = rest.split_once(')') {
                let name = name.trim();
                if name.is_empty() {
                    return names.get(&(kind, id.to_string())).cloned().unwrap_or_default();
                }
                names.insert((kind, id.to_string()), name.to_string());
                return name.to_string();
            }
        }
        v.to_string()
    };
    let mut out: HashMap<String, u64> = HashMap::new();
    let (mut ob, mut func) = (String::new(), String::new());
    let mut after_call = false;
    for line in dump.lines() {
        if std::mem::take(&mut after_call) {
            continue;
        }
        if let Some(v) = line.strip_prefix("ob=") {
            ob = resolve('o', v);
        } else if let Some(v) = line.strip_prefix("fn=") {
            let f = resolve('f', v);
            func = f.split_once('\'').map_or(f.as_str(), |(f, _)| f).to_string();
        } else if let Some(v) = line.strip_prefix("cfn=") {
            resolve('f', v);
        } else if let Some(v) = line.strip_prefix("cob=") {
            resolve('o', v);
        } else if line.starts_with("calls=") {
            after_call = true;
        } else if line.starts_with(|c: char| c.is_ascii_digit() || c == '+' || c == '-' || c == '*') {
            // Code without a symbol is named by its address: nothing a linker can place.
            if !ob.ends_with(object) || func.is_empty() || func.starts_with("0x") {
                continue;
            }
            if let Some(n) = line.split_whitespace().nth(1).and_then(|n| n.parse::<u64>().ok()) {
                *out.entry(func.clone()).or_default() += n;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = "\
version: 1
positions: line
events: Ir
ob=(1) /bin/weft-proxy
fl=(1) ???
fn=(1) _ZN4weft3hot17hE
0 100
cob=(2) /lib/libc.so.6
cfn=(2) memcpy
calls=3 0
0 5000
0 20
fn=(3) _ZN4weft4cold17hE'2
+1 7
fn=(4) 0x00000000002905f0
0 3
ob=(2)
fn=(2)
0 900
ob=(1)
fn=(1)
0 1
";

    #[test]
    fn coverage_counts_the_listed_names_the_binary_defines() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("order.txt");
        std::fs::write(&list, "main\nno_such_function_in_any_binary\n\n").unwrap();
        let bin = std::env::current_exe().unwrap();
        assert_eq!(coverage(&bin, &list).unwrap(), (1, 2), "`main` is defined, the other name is not");
    }

    #[test]
    fn native_samples_count_the_binarys_own_functions_only() {
        let script = "\
     55d5d4e18d77 _ZN8httparse12parse_reason17hE (/tmp/wp)
     55d5d4e18d99 _ZN8httparse12parse_reason17hE+0x2a (/tmp/wp)
 ffffffff813aecd3 finish_task_switch.isra.0 ([kernel.kallsyms])
     7f0000000001 __memmove_avx512_unaligned_erms (/usr/lib/x86_64-linux-gnu/libc.so.6)
     55d5d4e00000 [unknown] (/tmp/wp)
";
        let c = leaf_samples(script, Path::new("/tmp/wp"));
        assert_eq!(c.get("_ZN8httparse12parse_reason17hE"), Some(&2));
        assert_eq!(c.len(), 1, "kernel, libc and unknown samples are not listed: {c:?}");
    }

    #[test]
    fn self_cost_excludes_calls_and_other_objects_and_folds_recursion() {
        let c = self_costs(DUMP, "weft-proxy");
        assert_eq!(c.get("_ZN4weft3hot17hE"), Some(&121), "self lines of hot, the call's 5000 excluded");
        assert_eq!(c.get("_ZN4weft4cold17hE"), Some(&7), "recursion marker folded");
        assert_eq!(c.get("memcpy"), None, "libc's functions are not the binary's");
        assert_eq!(c.get("0x00000000002905f0"), None, "code without a symbol is not listed");
        assert_eq!(c.len(), 2);
    }
}
