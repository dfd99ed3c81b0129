//! `weft-bench`: the benchmark harness behind `bench/run.sh` (see docs/benchmarks.md).
//! weft's sidecars side by side with Envoy 1.40 (configured by the same control plane),
//! HAProxy and no proxy at all, in one run on one machine.
#![forbid(unsafe_code)]

mod gate;
mod layout;
mod mesh;
mod outside;
mod procs;
mod profile;
mod report;
mod run;
mod soak;
mod stack;
mod wake;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use weft_bench::{echo, load};

#[derive(Parser)]
#[command(name = "weft-bench", about = "weft's benchmark harness (bench/run.sh)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the scenarios, write bench/results/<date>.json and render the report.
    Run {
        #[command(flatten)]
        args: Box<run::RunArgs>,
        #[command(flatten)]
        doc: DocArgs,
    },
    /// Memory under many concurrent connections: the weft stack under `--conns`
    /// closed-loop connections for `--secs`, both sidecars' RSS sampled during and after
    /// (writes bench/results/soak-<date>.json, prints the samples as a table).
    Soak {
        #[command(flatten)]
        args: Box<soak::SoakArgs>,
    },
    /// The outside method (issue 20): every pair unpinned, HTTP/1.1 at a fixed rate and a
    /// one-worker maximum, interleaved rounds; writes bench/results/outside-<date>.json and
    /// prints the table.
    Outside {
        #[command(flatten)]
        args: Box<outside::OutsideArgs>,
    },
    /// Regression gate: weft's pairs against bench/gate-baseline.json (a few minutes);
    /// exits 1 on a clear regression. `--save` records a new baseline.
    Gate {
        #[command(flatten)]
        args: Box<gate::GateArgs>,
    },
    /// Profiles one pair of the outside method under load (`perf record --call-graph
    /// dwarf` on both proxies) and writes folded stacks and the top functions.
    Profile {
        #[command(flatten)]
        args: Box<profile::ProfileArgs>,
    },
    /// Counts the user-space instructions per request of weft's pairs with callgrind
    /// (contention-proof A/B of proxy builds; `--alt-proxy`). Prints JSON lines.
    Instr {
        #[command(flatten)]
        args: Box<profile::InstrArgs>,
    },
    /// The functions a sidecar executes, hottest first (both proxies of each pair under
    /// callgrind from start-up): writes the linker's symbol ordering list,
    /// crates/weft-proxy/link/symbol-order.txt, from a shipped-profile build.
    Layout {
        #[command(flatten)]
        args: Box<layout::LayoutArgs>,
    },
    /// System calls, context switches and kernel time per request of each proxy at a
    /// fixed rate (perf stat on syscall tracepoints; `--alt-proxy` for A/B). Prints JSON
    /// lines and a table.
    Wake {
        #[command(flatten)]
        args: Box<wake::WakeArgs>,
    },
    /// Render the report from a results file.
    Render {
        /// Results JSON.
        #[arg(long, default_value = "bench/results/latest.json")]
        results: PathBuf,
        #[command(flatten)]
        doc: DocArgs,
    },
    /// The echo application (started by `run`): prints `echo h1=ADDR grpc=ADDR`.
    Echo,
    /// One load run against an address (for profiling): prints the result as JSON.
    Load {
        /// Where to connect.
        #[arg(long)]
        addr: std::net::SocketAddr,
        /// Request URI (absolute form).
        #[arg(long, default_value = "http://echo:9080/")]
        uri: String,
        /// Requests per second (fixed rate); 0 = closed loop, as fast as possible.
        #[arg(long, default_value_t = 1000)]
        rps: u32,
        #[arg(long, default_value_t = 16)]
        conns: usize,
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// gRPC unary over h2c instead of HTTP/1.1 (fixed rate only).
        #[arg(long)]
        grpc: bool,
    },
}

#[derive(Clone, Debug, clap::Args)]
struct DocArgs {
    /// The report to write.
    #[arg(long, default_value = "docs/benchmarks.md")]
    doc: PathBuf,
    /// Hand-written text appended after the tables.
    #[arg(long, default_value = "bench/notes.md")]
    notes: PathBuf,
    /// The outside method's results shown in the report (`weft-bench outside`).
    #[arg(long, default_value = "bench/results/outside-latest.json")]
    outside: PathBuf,
    /// The command named in the report as the way to reproduce it.
    #[arg(long, default_value = "bench/run.sh")]
    command: String,
}

fn write_doc(results: &run::Results, doc: &DocArgs) -> anyhow::Result<()> {
    let notes = std::fs::read_to_string(&doc.notes).unwrap_or_default();
    // The outside method's latest run (`weft-bench outside`), when there is one.
    let outside: Option<outside::OutsideResults> = std::fs::read_to_string(&doc.outside)
        .ok()
        .map(|t| serde_json::from_str(&t))
        .transpose()
        .map_err(|e| anyhow::anyhow!("{}: {e}", doc.outside.display()))?;
    std::fs::write(&doc.doc, report::render(results, outside.as_ref(), &notes, &doc.command))?;
    eprintln!("bench: wrote {}", doc.doc.display());
    Ok(())
}

fn multi_thread() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Echo => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(echo::run())),
        Cmd::Load { addr, uri, rps, conns, secs, grpc } => {
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(anyhow::Error::from).and_then(
                |rt| {
                    rt.block_on(async {
                        let target = load::Target { addr, uri: uri.parse()? };
                        let d = std::time::Duration::from_secs(secs);
                        let r = match (grpc, rps) {
                            (true, _) => load::grpc_fixed_rate(&target, rps.max(1), conns, d).await?,
                            (false, 0) => load::h1_max(&target, conns, d).await?,
                            (false, _) => load::h1_fixed_rate(&target, rps, conns, d).await?,
                        };
                        println!("{}", serde_json::to_string(&r)?);
                        Ok(())
                    })
                },
            )
        }
        Cmd::Soak { args } => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(soak::run(&args)))
            .map(|(_, file)| eprintln!("bench: wrote {}", file.display())),
        Cmd::Outside { args } => multi_thread().and_then(|rt| rt.block_on(outside::run(&args))).map(|(r, file)| {
            println!("{}", outside::table(&r));
            eprintln!("bench: wrote {}", file.display());
        }),
        Cmd::Gate { args } => match multi_thread().and_then(|rt| rt.block_on(gate::run(&args))) {
            Ok(true) => Ok(()),
            Ok(false) => Err(anyhow::anyhow!("gate: a figure regressed (table above)")),
            Err(e) => Err(e),
        },
        Cmd::Profile { args } => multi_thread().and_then(|rt| rt.block_on(profile::profile(&args))),
        Cmd::Instr { args } => multi_thread().and_then(|rt| rt.block_on(profile::instr(&args))).and_then(|runs| {
            for r in runs {
                println!("{}", serde_json::to_string(&r)?);
            }
            Ok(())
        }),
        Cmd::Layout { args } => multi_thread().and_then(|rt| rt.block_on(layout::layout(&args))).map(|(n, total)| {
            eprintln!("layout: {n} functions ({total} instructions) listed in {}", args.out.display());
        }),
        Cmd::Wake { args } => multi_thread().and_then(|rt| rt.block_on(wake::run(&args))).and_then(|runs| {
            for r in &runs {
                println!("{}", serde_json::to_string(r)?);
            }
            for r in &runs {
                eprintln!("{}", wake::line(r));
            }
            Ok(())
        }),
        Cmd::Render { results, doc } => std::fs::read_to_string(&results)
            .map_err(anyhow::Error::from)
            .and_then(|text| Ok(serde_json::from_str::<run::Results>(&text)?))
            .and_then(|r| write_doc(&r, &doc)),
        Cmd::Run { args, doc } => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(run::run(&args)))
            .and_then(|(results, file)| {
                eprintln!("bench: wrote {}", file.display());
                write_doc(&results, &doc)
            }),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-bench: FAILED: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
