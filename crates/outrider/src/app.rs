//! Builds the whole server from its settings, in one place, so `main`, tests
//! and benchmarks start it the same way.

use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch, Notify};
use tokio::task::JoinHandle;

use crate::api::{self, AppState};
use crate::bootstrap::{first_start, FirstStart};
use crate::config::ServeConfig;
use crate::delivery::breaker::Breakers;
use crate::delivery::client::{tls_config, CallbackClient};
use crate::delivery::guard::Guard;
use crate::delivery::policy::RetryPolicy;
use crate::delivery::Dispatcher;
use crate::domain::new_id;
use crate::providers::local::models::DEFAULT_MODEL;
use crate::providers::{Local, OpenAi, Providers, Scripted};
use crate::runtime::Runtime;
use crate::secrets::SecretBox;
use crate::store;
use crate::worker::{Running, WorkerConfig, Workers};

/// A server bound to its port, with its background work ready to start.
pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    header_timeout: std::time::Duration,
    workers: Option<Arc<Workers>>,
    dispatcher: Arc<Dispatcher>,
    stop: watch::Sender<bool>,
    first_start: Option<FirstStart>,
}

impl Application {
    /// Opens the store, binds the listener and wires every part together.
    pub async fn build(config: ServeConfig) -> anyhow::Result<Self> {
        let store = store::open(&config.database.database_url)
            .await
            .with_context(|| format!("opening database {}", config.database.database_url))?;
        let secrets = SecretBox::new(config.database.encryption_key.as_deref())?;
        let sealed = secrets.prepare(&store).await?;
        if sealed > 0 {
            tracing::info!(sealed, "signing secrets sealed under the encryption key");
        }
        let first_start = first_start(&store, &secrets, &config.database.database_url).await?;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listening on {}", config.listen))?;
        let address = listener.local_addr()?;
        let public_url = config
            .public_url
            .clone()
            .unwrap_or_else(|| default_public_url(address));

        let owner = format!("{}-{}", std::process::id(), new_id());
        let guard = Guard::new(config.callback_allow.clone());
        let work_ready = Arc::new(Notify::new());
        let delivery_ready = Arc::new(Notify::new());
        let (finished, _) = broadcast::channel(1024);
        let running = Running::default();
        let (stop, stopping) = watch::channel(false);

        let tls = tls_config(config.callback_ca_file.as_deref())?;
        let client = CallbackClient::new(guard.clone(), config.callback_timeout, tls)?;
        let dispatcher = Arc::new(Dispatcher {
            store: store.clone(),
            client,
            policy: RetryPolicy::new(config.retry_schedule.clone()),
            owner: owner.clone(),
            concurrency: usize::from(config.delivery_concurrency),
            per_destination: usize::from(config.delivery_per_destination),
            // A delivery claimed ahead may wait for the attempt ahead of it
            // (which may wait for another to free a permit), then makes its
            // own: three budgets at most.
            lease: 3 * config.callback_timeout + std::time::Duration::from_secs(10),
            ready: delivery_ready.clone(),
            held: Default::default(),
            secrets: secrets.clone(),
            breakers: Breakers::new(config.circuit_failures, config.circuit_cooldown),
        });

        let workers = (config.workers > 0)
            .then(|| -> anyhow::Result<_> {
                let providers = providers(&config)?;
                if first_start.is_some() && config.model_pull {
                    // The agent just made needs the local model: fetch it
                    // now rather than in the first session.
                    let local = providers.local.clone();
                    tokio::spawn(async move { local.prefetch(DEFAULT_MODEL).await });
                }
                Ok(Arc::new(Workers {
                    store: store.clone(),
                    runtime: Arc::new(Runtime::new(providers)),
                    config: WorkerConfig {
                        concurrency: usize::from(config.workers),
                        lease: config.lease,
                        poll: std::time::Duration::from_secs(1),
                        public_url: public_url.clone(),
                        callback_deadline: config.callback_deadline,
                    },
                    owner,
                    work_ready: work_ready.clone(),
                    delivery_ready: delivery_ready.clone(),
                    finished: finished.clone(),
                    running: running.clone(),
                }))
            })
            .transpose()?;

        let state = AppState {
            store,
            guard,
            public_url,
            sync_timeout: config.sync_timeout,
            work_ready,
            delivery_ready,
            finished,
            running,
            stopping,
            secrets,
            body_timeout: config.header_timeout,
            callback_deadline: config.callback_deadline,
        };
        Ok(Self {
            listener,
            router: api::router(state),
            header_timeout: config.header_timeout,
            workers,
            dispatcher,
            stop,
            first_start,
        })
    }

    /// What this start created, if the database was empty.
    pub fn first_start(&self) -> Option<&FirstStart> {
        self.first_start.as_ref()
    }

    /// The address actually bound (useful with port 0).
    pub fn address(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` resolves, then stops claiming new work.
    ///
    /// Sessions and attempts still running when the process exits keep their
    /// leases until they lapse, and are then taken over.
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let stop = self.stop;
        let stopped = stop.subscribe();
        let mut background: Vec<JoinHandle<()>> = Vec::new();
        if let Some(workers) = self.workers {
            background.push(tokio::spawn(workers.run(stopped.clone())));
        }
        background.push(tokio::spawn(self.dispatcher.run(stopped)));

        // Stopping is announced before open requests drain, so that event
        // streams and synchronous calls answer instead of holding the drain.
        let announce = stop.clone();
        let shutdown = async move {
            shutdown.await;
            let _ = announce.send(true);
        };
        crate::serve::serve(self.listener, self.router, self.header_timeout, shutdown).await;
        let _ = stop.send(true);
        for task in background {
            let _ = task.await;
        }
        Ok(())
    }
}

/// `http://<listen address>`, except that a wildcard address (which no
/// client can reach) becomes the loopback address, with a warning.
fn default_public_url(address: SocketAddr) -> String {
    if !address.ip().is_unspecified() {
        return format!("http://{address}");
    }
    let port = address.port();
    tracing::warn!(
        "listening on every interface without --public-url; events_url will name \
         http://127.0.0.1:{port}, which only local clients can reach"
    );
    format!("http://127.0.0.1:{port}")
}

fn providers(config: &ServeConfig) -> anyhow::Result<Providers> {
    let tls = tls_config(None)?;
    let openai = OpenAi::new(
        &config.openai_base_url,
        config.openai_api_key.clone(),
        config.model_timeout,
        tls,
    )?;
    let local = Local::new(config.models.dir(), config.model_pull, config.model_timeout);
    Ok(Providers {
        local: Arc::new(local),
        openai: Arc::new(openai),
        scripted: Arc::new(Scripted),
    })
}
