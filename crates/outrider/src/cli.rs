//! The `outrider` command line: `serve` and `org create`.

use clap::{Parser, Subcommand};
use serde_json::json;

use crate::api::{generate_signing_secret, ApiKeyParts};
use crate::app::Application;
use crate::config::{DatabaseConfig, ServeConfig};
use crate::domain::new_id;
use crate::store::{self, NewOrg};

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
        }
    }
}

async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let app = Application::build(config).await?;
    // Tests and scripts read this line to learn the port.
    println!("outrider listening on http://{}", app.address());
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
    let store = store::open(&database.database_url).await?;
    let key = ApiKeyParts::generate();
    let org = NewOrg {
        id: new_id(),
        name: name.to_owned(),
        signing_secret: generate_signing_secret(),
        key_id: key.id.clone(),
        key_hash: key.hash.clone(),
    };
    store.create_org(org.clone()).await?;

    if as_json {
        let out =
            json!({"org_id": org.id, "api_key": key.key, "signing_secret": org.signing_secret});
        println!("{out}");
    } else {
        println!("organisation:   {} ({})", org.name, org.id);
        println!("api key:        {}", key.key);
        println!("signing secret: {}", org.signing_secret);
        println!("Both are shown only now; keep them somewhere safe.");
    }
    Ok(())
}
