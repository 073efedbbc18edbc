//! The scripted provider: replies come from the agent definition.
//!
//! Step `n` gets the script's `n`-th reply; once the script runs out the last
//! reply repeats. Users rehearse their callback handling with it, and tests
//! use it to drive the agent loop without a model.

use super::{ChatRequest, Completion, Provider, ProviderError};
use crate::domain::ToolCall;
use async_trait::async_trait;
use serde_json::json;

/// Answers from the agent's `script`.
#[derive(Debug, Default)]
pub struct Scripted;

#[async_trait]
impl Provider for Scripted {
    async fn complete(&self, request: ChatRequest<'_>) -> Result<Completion, ProviderError> {
        let script = &request.agent.script;
        let index = (request.step as usize)
            .saturating_sub(1)
            .min(script.len().saturating_sub(1));
        let reply = script
            .get(index)
            .ok_or_else(|| ProviderError::fatal("the agent's script is empty"))?;

        let tool_calls = reply
            .tool_calls
            .iter()
            .enumerate()
            .map(|(i, call)| ToolCall {
                id: format!("call_{}_{}", request.step, i + 1),
                name: call.name.clone(),
                arguments: call.arguments.to_string(),
            })
            .collect();
        Ok(Completion {
            content: reply.content.clone(),
            tool_calls,
            usage: json!({}),
        })
    }
}
