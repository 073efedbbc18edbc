//! The agent loop: call the model, run the tools it asks for, repeat.
//!
//! A step is one model call plus the tool calls it asked for; `max_steps`
//! bounds the model calls. Every step is committed as events as it happens,
//! and the conversation is rebuilt from those events, so a session that a
//! worker takes over after a crash resumes after its last recorded step
//! instead of starting again.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

use crate::domain::{Event, EventKind, Message, Session, SessionError, ToolCall};
use crate::providers::{ChatRequest, Completion, Providers};
use crate::store::{DynStore, Outcome, StoreError};
use crate::tools;

/// How often a failing model call is tried before the session fails.
const MODEL_TRIES: u32 = 3;

/// A cancel request reaching a running session: from the API in this
/// process at once, or from the lease keeper when it was made elsewhere.
#[derive(Debug, Default)]
pub struct Control {
    cancelled: AtomicBool,
    wake: Notify,
}

impl Control {
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        self.wake.notify_waiters();
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// Resolves once the session is cancelled.
    pub async fn cancelled(&self) {
        loop {
            // Registered before the check, so a cancel in between still wakes it.
            let woken = self.wake.notified();
            if self.is_cancelled() {
                return;
            }
            woken.await;
        }
    }
}

/// Appends a session's events while its worker holds the lease.
pub struct Recorder {
    pub store: DynStore,
    pub session_id: String,
    pub owner: String,
}

impl Recorder {
    async fn record(&self, kind: EventKind, data: Value) -> Result<(), StoreError> {
        let session = &self.session_id;
        self.store
            .append_event(session, &self.owner, kind, data)
            .await?;
        Ok(())
    }
}

/// The assistant's reply as the `llm_call` event stores it.
#[derive(Debug, Serialize, Deserialize)]
struct Reply {
    content: Option<String>,
    #[serde(default)]
    tool_calls: Vec<ToolCall>,
}

/// Runs agents.
pub struct Runtime {
    providers: Providers,
    retry_pause: Duration,
}

/// Where a session stands, rebuilt from its events.
struct Progress {
    messages: Vec<Message>,
    steps: u32,
    pending: Vec<ToolCall>,
    answer: Option<String>,
}

impl Runtime {
    pub fn new(providers: Providers) -> Self {
        Self {
            providers,
            retry_pause: Duration::from_secs(1),
        }
    }

    /// Runs the session from wherever its events leave off to its outcome.
    ///
    /// Fails only when the store does (including a lost lease): the session
    /// is then left for whichever worker holds it next.
    pub async fn run(
        &self,
        session: &Session,
        history: &[Event],
        recorder: &Recorder,
        control: &Control,
    ) -> Result<Outcome, StoreError> {
        let mut progress = replay(session, history);
        if let Some(answer) = progress.answer {
            return Ok(Outcome::Succeeded { output: answer });
        }
        let max_steps = session.agent.max_steps;
        loop {
            for call in std::mem::take(&mut progress.pending) {
                if control.is_cancelled() {
                    return Ok(Outcome::Cancelled);
                }
                let result = run_tool(session, &call, progress.steps, recorder).await?;
                progress.messages.push(result);
            }

            if progress.steps >= max_steps {
                let error =
                    SessionError::new("EXECUTION_ERROR", "Agent exceeded maximum step count");
                return Ok(Outcome::Failed(error));
            }
            let step = progress.steps + 1;
            let call = self.call_model(session, &progress.messages, step);
            let completion = tokio::select! {
                completion = call => completion,
                () = control.cancelled() => return Ok(Outcome::Cancelled),
            };
            let completion = match completion {
                Ok(completion) => completion,
                Err(error) => return Ok(Outcome::Failed(error)),
            };
            let reply = Reply {
                content: completion.content,
                tool_calls: completion.tool_calls,
            };
            let event = json!({
                "step": step,
                "model_provider": session.agent.model_provider,
                "model": session.agent.model,
                "message": reply,
                "usage": completion.usage,
            });
            recorder.record(EventKind::LlmCall, event).await?;
            progress.steps = step;
            progress.messages.push(Message::Assistant {
                content: reply.content.clone(),
                tool_calls: reply.tool_calls.clone(),
            });

            if reply.tool_calls.is_empty() {
                let output = reply.content.unwrap_or_default();
                let data = json!({ "step": step, "content": output });
                recorder.record(EventKind::Message, data).await?;
                return Ok(Outcome::Succeeded { output });
            }
            progress.pending = reply.tool_calls;
        }
    }

    /// One model call, tried again after a pause when the failure is
    /// transient.
    async fn call_model(
        &self,
        session: &Session,
        messages: &[Message],
        step: u32,
    ) -> Result<Completion, SessionError> {
        let provider = self.providers.for_agent(&session.agent);
        let mut tries = 0;
        loop {
            tries += 1;
            let request = ChatRequest {
                agent: &session.agent,
                messages,
                step,
            };
            match provider.complete(request).await {
                Ok(completion) => return Ok(completion),
                Err(error) if error.retryable && tries < MODEL_TRIES => {
                    tracing::warn!(
                        session.id = %session.id,
                        step,
                        error = %error,
                        "model call failed; trying again"
                    );
                    tokio::time::sleep(self.retry_pause * tries).await;
                }
                Err(error) => return Err(SessionError::new(error.code, error.message)),
            }
        }
    }
}

/// Runs one tool call and records it; the returned message carries the
/// result (or the error) back to the model.
async fn run_tool(
    session: &Session,
    call: &ToolCall,
    step: u32,
    recorder: &Recorder,
) -> Result<Message, StoreError> {
    let granted = session.agent.tools.iter().any(|name| name == &call.name);
    let result = match tools::find(&call.name).filter(|_| granted) {
        Some(tool) => tools::run(tool, &call.arguments),
        None => Err(format!("the agent has no tool named {:?}", call.name)),
    };

    let mut data = json!({
        "step": step,
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments,
    });
    let (kind, content) = match result {
        Ok(value) => {
            data["result"] = value.clone();
            (EventKind::ToolCall, value.to_string())
        }
        Err(error) => {
            data["error"] = json!(error);
            (EventKind::ToolError, json!({ "error": error }).to_string())
        }
    };
    recorder.record(kind, data).await?;
    Ok(Message::Tool {
        tool_call_id: call.id.clone(),
        content,
    })
}

/// Rebuilds the conversation and the step count from recorded events.
fn replay(session: &Session, history: &[Event]) -> Progress {
    let mut messages = Vec::new();
    if let Some(system) = &session.agent.system {
        messages.push(Message::System {
            content: system.clone(),
        });
    }
    messages.extend(session.input.iter().map(Message::from));

    let mut progress = Progress {
        messages,
        steps: 0,
        pending: Vec::new(),
        answer: None,
    };
    for event in history {
        replay_event(&mut progress, event);
    }
    progress
}

fn replay_event(progress: &mut Progress, event: &Event) {
    match event.kind {
        EventKind::LlmCall => {
            let reply: Reply =
                serde_json::from_value(event.data["message"].clone()).unwrap_or(Reply {
                    content: None,
                    tool_calls: Vec::new(),
                });
            progress.steps += 1;
            progress.pending = reply.tool_calls.clone();
            progress.messages.push(Message::Assistant {
                content: reply.content,
                tool_calls: reply.tool_calls,
            });
        }
        EventKind::ToolCall | EventKind::ToolError => {
            let call_id = event.data["call_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let content = match event.data.get("result") {
                Some(result) => result.to_string(),
                None => json!({ "error": event.data["error"] }).to_string(),
            };
            progress.pending.retain(|call| call.id != call_id);
            progress.messages.push(Message::Tool {
                tool_call_id: call_id,
                content,
            });
        }
        EventKind::Message => {
            progress.answer = event.data["content"].as_str().map(str::to_owned);
        }
        EventKind::SessionStart | EventKind::SessionEnd => {}
    }
}

/// Shared so the worker can hand one to each running session.
pub type SharedRuntime = Arc<Runtime>;
