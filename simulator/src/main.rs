//! `simulator`: runs seeded simulations of Portolan clusters and reports each.
//!
//! ```text
//! cargo run --release -p simulator -- --seed 7 --regions 2 --nodes 3 --duration 2h --faults heavy
//! cargo run --release -p simulator -- --seeds 0..50          # a sweep
//! ```

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use simulator::faults::Intensity;
use simulator::{Bug, SimConfig};

#[derive(Parser, Debug)]
#[command(
    name = "simulator",
    about = "Deterministic simulation of a Portolan cluster"
)]
struct Args {
    /// Seed of a single run.
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// A sweep: seeds A..B (B excluded).
    #[arg(long)]
    seeds: Option<String>,
    #[arg(long, default_value_t = 2)]
    regions: usize,
    /// Nodes per region.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Simulated length of the safety phase: 90s, 10m, 2h.
    #[arg(long, default_value = "60s")]
    duration: String,
    #[arg(long, value_enum, default_value_t = Intensity::Heavy)]
    faults: Intensity,
    /// Clients per region.
    #[arg(long, default_value_t = 3)]
    clients: usize,
    /// Break a promise on purpose (the simulator's self-test).
    #[arg(long, value_enum)]
    bug: Option<Bug>,
    /// Print every trace line.
    #[arg(long)]
    trace: bool,
    /// Run each seed twice and fail if the trace hashes differ.
    #[arg(long)]
    check_determinism: bool,
    /// Wall-clock time a run may take before it fails (default: 10m plus a quarter of
    /// --duration).
    #[arg(long)]
    wall_limit: Option<String>,
    /// Wall-clock time simulated time may stand still before the run fails (a task that
    /// spins without awaiting).
    #[arg(long, default_value = "60s")]
    stall_limit: String,
}

/// Parses `500ms`, `90s`, `10m`, `2h`.
fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .with_context(|| format!("duration {s:?} needs a unit (ms, s, m, h)"))?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().with_context(|| format!("duration {s:?}"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => bail!("duration {s:?}: unit must be ms, s, m or h"),
    })
}

fn parse_seeds(s: &str) -> Result<std::ops::Range<u64>> {
    let (a, b) = s
        .split_once("..")
        .with_context(|| format!("seeds {s:?} must look like A..B"))?;
    let (a, b): (u64, u64) = (a.parse()?, b.parse()?);
    if b <= a {
        bail!("seeds {s:?}: B must be greater than A");
    }
    Ok(a..b)
}

fn main() -> ExitCode {
    match real_main() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("simulator: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> Result<bool> {
    let args = Args::parse();
    // Node logs on stderr when RUST_LOG asks for them (e.g. RUST_LOG=portolan_node=info).
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .without_time()
            .with_writer(std::io::stderr)
            .init();
    }
    if args.regions == 0 || args.nodes == 0 || args.clients == 0 {
        bail!("--regions, --nodes and --clients must be at least 1");
    }
    if args.regions > 9 || args.nodes > 9 {
        bail!("at most 9 regions of 9 nodes");
    }
    let seeds = match (&args.seed, &args.seeds) {
        (Some(s), _) => *s..*s + 1,
        (None, Some(r)) => parse_seeds(r)?,
        (None, None) => 0..1,
    };
    let duration = parse_duration(&args.duration)?;
    let wall_limit = match &args.wall_limit {
        Some(w) => parse_duration(w)?,
        None => simulator::default_wall_limit(duration),
    };
    let stall_limit = parse_duration(&args.stall_limit)?;
    let sweep = seeds.end - seeds.start > 1;
    let mut failed = Vec::new();
    for seed in seeds.clone() {
        let config = SimConfig {
            seed,
            regions: args.regions,
            nodes: args.nodes,
            duration,
            faults: args.faults,
            clients_per_region: args.clients,
            bug: args.bug,
            verbose: args.trace,
            wall_limit,
            stall_limit,
        };
        let summary = simulator::run(config.clone());
        let mut ok = summary.passed();
        if sweep && ok {
            println!(
                "seed {seed}: PASS  {:.0} s simulated in {:.1} s ({:.0}x), {} ops, {} faults, {} snapshot installs, trace {}",
                summary.simulated.as_secs_f64(),
                summary.wall.as_secs_f64(),
                summary.speedup(),
                summary.ops_ok + summary.ops_failed,
                summary.faults.values().sum::<u64>(),
                summary.snapshots_installed,
                &summary.trace_hash[..16]
            );
        } else {
            println!("{summary}");
        }
        if args.check_determinism {
            let again = simulator::run(SimConfig {
                verbose: false,
                ..config.clone()
            });
            if again.trace_hash != summary.trace_hash {
                println!(
                    "seed {seed}: NOT DETERMINISTIC: trace hash {} then {}\n  replay: {}",
                    summary.trace_hash,
                    again.trace_hash,
                    config.replay_command()
                );
                ok = false;
            }
        }
        if !ok {
            failed.push(seed);
        }
    }
    if sweep {
        println!(
            "sweep {}..{}: {} passed, {} failed{}",
            seeds.start,
            seeds.end,
            (seeds.end - seeds.start) as usize - failed.len(),
            failed.len(),
            if failed.is_empty() {
                String::new()
            } else {
                format!(" (seeds {failed:?})")
            }
        );
    }
    Ok(failed.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_seed_ranges_parse() {
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("3d").is_err());
        assert_eq!(parse_seeds("3..7").unwrap(), 3..7);
        assert!(parse_seeds("7..3").is_err());
        assert!(parse_seeds("x").is_err());
    }
}
