//! The `portolan` binary.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use portolan_node::config::{Config, DEFAULT_DATA_DIR, DEFAULT_LISTEN, DEFAULT_REGION};
use portolan_node::Node;

#[derive(Parser)]
#[command(
    name = "portolan",
    version,
    about = "A geo-replicated container registry"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the registry. With no flags: one node, region `local`, data in
    /// ./portolan-data, HTTP on 127.0.0.1:5000.
    Serve(ServeArgs),
    /// Validate a config file without serving.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML config file; flags given here override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// HTTP listen address [default: 127.0.0.1:5000]. Port 0 picks a free port.
    #[arg(long, help = format!("HTTP listen address [default: {DEFAULT_LISTEN}]; port 0 picks one"))]
    listen: Option<String>,
    /// Data directory [default: ./portolan-data].
    #[arg(long, help = format!("Data directory [default: {DEFAULT_DATA_DIR}]"))]
    data_dir: Option<PathBuf>,
    /// Region name [default: local].
    #[arg(long, help = format!("Region name [default: {DEFAULT_REGION}]"))]
    region: Option<String>,
    /// This node's id within its region [default: 1].
    #[arg(long)]
    node_id: Option<u64>,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Cmd::CheckConfig { file } => {
            let c = Config::from_file(&file)?.validate()?;
            println!(
                "{}: ok (listen {}, data dir {}, region {})",
                file.display(),
                c.http.listen,
                c.node.data_dir.display(),
                c.node.region
            );
            Ok(())
        }
        Cmd::Serve(args) => {
            let mut config = match &args.config {
                Some(f) => Config::from_file(f)?,
                None => Config::default(),
            };
            if let Some(l) = args.listen {
                config.http.listen = l;
            }
            if let Some(d) = args.data_dir {
                config.node.data_dir = d;
            }
            if let Some(r) = args.region {
                config.node.region = r;
            }
            if let Some(id) = args.node_id {
                config.node.id = id;
            }
            let config = config.validate()?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("start runtime")?;
            rt.block_on(serve(config))
        }
    }
}

async fn serve(config: Config) -> Result<()> {
    let node = Node::open(config).await?;
    node.serve(shutdown_signal(), |addr| {
        // The one line on stdout: scripts and tests wait for it.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on http://{addr}");
        let _ = out.flush();
    })
    .await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}
