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
    /// Print per organization and per layer whether it is isolated and verified.
    Status,
    /// Audit a PostgreSQL database's Row-Level Security without Kubernetes. Exits 1 when it finds
    /// anything (so it can gate a migration in CI), 2 when it cannot run.
    Audit(AuditArgs),
    /// Attack another organization's canaries with one organization's own credentials, in every
    /// layer, and print each answer. Exits 1 when any attempt was not refused.
    Probe(ProbeArgs),
}

#[derive(clap::Args)]
struct AuditArgs {
    /// Connection URL of a role that can read the catalog (prefer the env variable: a password
    /// on the command line is visible to other users of the machine).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// An IsolationPlatform manifest whose `spec.database` settings the audit uses (schemas,
    /// tenant column, identity function, overrides, exclusions).
    #[arg(long)]
    platform_file: Option<std::path::PathBuf>,
    /// Governed schema (repeatable); default `public`.
    #[arg(long = "schema")]
    schemas: Vec<String>,
    /// Column that carries the organization id.
    #[arg(long)]
    tenant_column: Option<String>,
    /// Schema-qualified identity function.
    #[arg(long)]
    identity_function: Option<String>,
    /// Table without the tenant column that is shared on purpose (repeatable).
    #[arg(long = "exclude")]
    excluded_tables: Vec<String>,
}

#[derive(clap::Args)]
struct ProbeArgs {
    /// The Organization whose credentials are used.
    #[arg(long = "as")]
    attacker: String,
    /// The Organization whose canaries are attacked; the operator's sentinel when omitted.
    #[arg(long)]
    against: Option<String>,
    /// Namespace of the operator (where the platform's Secrets live).
    #[arg(long, env = "BULKHEAD_NAMESPACE", default_value = "bulkhead-system")]
    namespace: String,
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
    /// Take a Lease before reconciling; only the holder reconciles and writes, and the process
    /// exits if it loses the lease.
    #[arg(long, env = "BULKHEAD_LEADER_ELECT")]
    leader_elect: bool,
    /// Name of the Lease, in the operator's namespace.
    #[arg(long, env = "BULKHEAD_LEASE_NAME", default_value = "bulkhead-leader")]
    lease_name: String,
    /// Seconds a lease stays valid without renewal; a standby takes over after it runs out.
    #[arg(long, env = "BULKHEAD_LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,
    /// ClusterRole granting Secret access that the operator binds to its own ServiceAccount in
    /// each organization's namespace (with --service-account); unset, no binding is made.
    #[arg(long, env = "BULKHEAD_NAMESPACE_ROLE", requires = "service_account")]
    namespace_role: Option<String>,
    /// The operator's ServiceAccount (in --namespace).
    #[arg(long, env = "BULKHEAD_SERVICE_ACCOUNT", requires = "namespace_role")]
    service_account: Option<String>,
    /// Watch credentials Secrets cluster-wide so an edit is repaired at once (needs cluster-wide
    /// Secret read access); otherwise edits are noticed at the next verification pass.
    #[arg(long, env = "BULKHEAD_WATCH_SECRETS")]
    watch_secrets: bool,
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
        Command::Status => status().await,
        Command::Probe(args) => probe(args).await,
        Command::Audit(args) => audit(args).await,
    }
}

async fn audit(args: AuditArgs) -> ExitCode {
    let mut spec = match audit_spec(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if !args.schemas.is_empty() {
        spec.schemas = args.schemas.clone();
    }
    if let Some(c) = &args.tenant_column {
        spec.tenant_column = c.clone();
    }
    if let Some(f) = &args.identity_function {
        spec.identity_function = f.clone();
    }
    spec.excluded_tables
        .extend(args.excluded_tables.iter().cloned());
    match bulkhead::layers::database::run_audit_cli(&args.database_url, &spec, args.json).await {
        Ok((out, findings)) => {
            print!("{out}");
            if findings {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// The database settings of `--platform-file`, or the defaults.
fn audit_spec(args: &AuditArgs) -> Result<bulkhead::api::platform::DatabasePlatform, String> {
    match &args.platform_file {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let platform: bulkhead::api::IsolationPlatform = serde_yaml::from_str(&text)
                .map_err(|e| format!("{}: not an IsolationPlatform: {e}", path.display()))?;
            platform
                .spec
                .database
                .ok_or_else(|| format!("{}: has no spec.database section", path.display()))
        }
        None => serde_json::from_value(
            serde_json::json!({ "adminUrlSecretRef": { "name": "unused", "key": "unused" } }),
        )
        .map_err(|e| e.to_string()),
    }
}

async fn client() -> Result<kube::Client, ExitCode> {
    kube::Client::try_default().await.map_err(|e| {
        eprintln!("error: cannot build a Kubernetes client (KUBECONFIG or in-cluster config): {e}");
        ExitCode::FAILURE
    })
}

async fn status() -> ExitCode {
    let client = match client().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match kube::Api::<bulkhead::api::Organization>::all(client)
        .list(&Default::default())
        .await
    {
        Ok(list) => {
            print!("{}", bulkhead::cli::status_table(&list.items));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cannot list Organizations: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn probe(args: ProbeArgs) -> ExitCode {
    let client = match client().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let target = args.against.as_deref().unwrap_or("the sentinel");
    let results = match bulkhead::cli::cross_tenant_probe(
        client,
        &args.namespace,
        &args.attacker,
        args.against.as_deref(),
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut rows = vec![vec![
        "LAYER".to_owned(),
        "ATTEMPT".to_owned(),
        "RESULT".to_owned(),
        "ANSWER".to_owned(),
    ]];
    let mut failed = false;
    for (kind, res) in results {
        match res {
            Err(e) => {
                failed = true;
                rows.push(vec![kind.to_string(), "-".into(), "ERROR".into(), e]);
            }
            Ok(probes) => {
                for p in probes {
                    failed |= !p.passed;
                    let result = if p.passed { "as required" } else { "BREACH" };
                    rows.push(vec![kind.to_string(), p.name, result.into(), p.detail]);
                }
            }
        }
    }
    println!(
        "{} attacks {} with its own credentials:",
        args.attacker, target
    );
    print!("{}", bulkhead::cli::render(&rows));
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
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
    let instance = std::env::var("POD_NAME").ok().or_else(hostname);
    let access =
        args.namespace_role
            .zip(args.service_account)
            .map(
                |(cluster_role, service_account)| controller::NamespaceAccess {
                    cluster_role,
                    service_account,
                },
            );
    // Replicas on one host (or outside a Pod) still need distinct lease identities.
    let identity = std::env::var("POD_NAME").unwrap_or_else(|_| {
        format!(
            "{}-{}",
            instance.clone().unwrap_or_else(|| "bulkhead".into()),
            std::process::id()
        )
    });
    let ctx = Arc::new(
        Context::new(
            client.clone(),
            args.namespace.clone(),
            metrics.clone(),
            instance,
        )
        .with_platform_filter(args.platform)
        .with_namespace_access(access),
    );
    let server = tokio::spawn(telemetry::serve(
        args.metrics_addr,
        metrics.clone(),
        health.clone(),
    ));
    let opts = RunOptions {
        concurrency: args.concurrency.max(1),
        watch_secrets: args.watch_secrets,
    };
    let controllers = async {
        if args.leader_elect {
            leader::run_as_leader(
                client,
                &args.namespace,
                &args.lease_name,
                &identity,
                args.lease_seconds,
                &metrics,
                || controller::run(ctx.clone(), health.clone(), opts.clone()),
            )
            .await
        } else {
            controller::run(ctx.clone(), health.clone(), opts.clone()).await;
            ExitCode::SUCCESS
        }
    };
    tokio::select! {
        code = controllers => {
            tracing::info!("controllers stopped");
            code
        }
        res = server => {
            tracing::error!(result = ?res, "metrics server stopped");
            ExitCode::FAILURE
        }
    }
}

mod leader {
    use std::future::Future;
    use std::process::ExitCode;

    use bulkhead::telemetry::Metrics;
    use kube_lease_manager::LeaseManagerBuilder;

    /// Waits for the Lease, runs `controllers` while holding it, and returns a failure exit code
    /// as soon as the lease is lost so that a lost leader never writes.
    pub async fn run_as_leader<F, Fut>(
        client: kube::Client,
        namespace: &str,
        lease_name: &str,
        identity: &str,
        lease_seconds: u64,
        metrics: &Metrics,
        controllers: F,
    ) -> ExitCode
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = ()>,
    {
        let grace = (lease_seconds / 3).max(1);
        let manager = match LeaseManagerBuilder::new(client, lease_name)
            .with_namespace(namespace)
            .with_identity(identity)
            .with_duration(lease_seconds)
            .with_grace(grace)
            .build()
            .await
        {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "cannot set up leader election");
                return ExitCode::FAILURE;
            }
        };
        let (mut leading, task) = manager.watch().await;
        tracing::info!(
            lease = lease_name,
            namespace,
            identity,
            "waiting for the leader lease"
        );
        while !*leading.borrow_and_update() {
            if leading.changed().await.is_err() {
                tracing::error!("leader election stopped before the lease was taken");
                return ExitCode::FAILURE;
            }
        }
        metrics.leader.set(1);
        tracing::info!(
            lease = lease_name,
            identity,
            "leader lease taken; reconciling"
        );
        let lost = async {
            loop {
                if leading.changed().await.is_err() || !*leading.borrow() {
                    return;
                }
            }
        };
        tokio::select! {
            () = controllers() => {
                task.abort();
                ExitCode::SUCCESS
            }
            () = lost => {
                metrics.leader.set(0);
                tracing::error!(lease = lease_name, "leader lease lost; exiting so that only the leader writes");
                ExitCode::FAILURE
            }
        }
    }
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
}
