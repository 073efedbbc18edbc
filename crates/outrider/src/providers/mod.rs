//! Model back ends behind one [`Provider`] trait.
//!
//! A provider turns a conversation and the agent's tools into the model's
//! next message: text, tool calls, or both. Providers know nothing of the
//! store; the runtime records what they return.

pub mod local;
mod openai;
mod scripted;

pub use local::Local;
pub use openai::OpenAi;
pub use scripted::Scripted;

use crate::domain::{AgentSpec, Message, ModelProvider, ToolCall};
use async_trait::async_trait;
use serde_json::Value;
use std::sync::Arc;

/// One model call's input.
pub struct ChatRequest<'a> {
    pub agent: &'a AgentSpec,
    pub messages: &'a [Message],
    /// The 1-based step this call belongs to.
    pub step: u32,
}

/// The model's reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub content: Option<String>,
    pub tool_calls: Vec<ToolCall>,
    /// Token counts and timings, recorded as they are in the `llm_call` event.
    pub usage: Value,
}

/// Why a model call failed.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ProviderError {
    /// Worth trying the same call again (network error, 429, 5xx).
    pub retryable: bool,
    /// The session error's code if the session fails of this.
    pub code: &'static str,
    pub message: String,
}

impl ProviderError {
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            retryable: true,
            code: "MODEL_ERROR",
            message: message.into(),
        }
    }

    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            retryable: false,
            code: "MODEL_ERROR",
            message: message.into(),
        }
    }

    /// The model is not there to call (not installed, not loadable).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            retryable: false,
            code: "MODEL_UNAVAILABLE",
            message: message.into(),
        }
    }
}

/// A model back end.
#[async_trait]
pub trait Provider: Send + Sync {
    async fn complete(&self, request: ChatRequest<'_>) -> Result<Completion, ProviderError>;
}

/// The configured providers, chosen per agent.
#[derive(Clone)]
pub struct Providers {
    pub local: Arc<Local>,
    pub openai: Arc<OpenAi>,
    pub scripted: Arc<Scripted>,
}

impl Providers {
    /// The provider an agent runs on.
    pub fn for_agent(&self, agent: &AgentSpec) -> &dyn Provider {
        match agent.model_provider {
            ModelProvider::Local => self.local.as_ref(),
            ModelProvider::Openai => self.openai.as_ref(),
            ModelProvider::Scripted => self.scripted.as_ref(),
        }
    }
}
