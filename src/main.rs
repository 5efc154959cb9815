//! `bulkhead`: run the operator, print its CRDs, audit a database, probe an organization.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use bulkhead::controller::{self, Context, RunOptions};
use bulkhead::telemetry::{self, Health, Metrics};

#[derive(Parser)]
#[command(
    name = "bulkhead",
    version,
    about = "Provisions tenant isolation in every layer and keeps proving it holds"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controllers against the cluster in KUBECONFIG or the in-cluster config.
    Run(RunArgs),
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Namespace of the operator: where platform Secrets and BYOK source keys live.
    #[arg(long, env = "BULKHEAD_NAMESPACE", default_value = "bulkhead-system")]
    namespace: String,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "BULKHEAD_METRICS_ADDR", default_value = "127.0.0.1:8080")]
    metrics_addr: SocketAddr,
    /// Organizations reconciled at once.
    #[arg(long, env = "BULKHEAD_CONCURRENCY", default_value_t = 8)]
    concurrency: u16,
    /// Handle only the Organizations of this IsolationPlatform (sharding; isolated test runs).
    #[arg(long, env = "BULKHEAD_PLATFORM")]
    platform: Option<String>,
    /// Log one JSON object per line.
    #[arg(long, env = "BULKHEAD_LOG_JSON")]
    log_json: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    bulkhead::install_crypto_provider();
    match cli.command {
        Command::Crd => match bulkhead::api::crds_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: cannot render the CRDs: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => run(args).await,
    }
}

async fn run(args: RunArgs) -> ExitCode {
    telemetry::init_logging(args.log_json);
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build a Kubernetes client (KUBECONFIG or in-cluster config)");
            return ExitCode::FAILURE;
        }
    };
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    let instance = std::env::var("POD_NAME").ok().or_else(|| hostname());
    let ctx = Arc::new(Context::new(
        client,
        args.namespace,
        metrics.clone(),
        instance,
    ));
    let server = tokio::spawn(telemetry::serve(args.metrics_addr, metrics, health.clone()));
    tokio::select! {
        () = controller::run(ctx, health, RunOptions { concurrency: args.concurrency.max(1) }) => {
            tracing::info!("controllers stopped");
            ExitCode::SUCCESS
        }
        res = server => {
            tracing::error!(result = ?res, "metrics server stopped");
            ExitCode::FAILURE
        }
    }
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
}
