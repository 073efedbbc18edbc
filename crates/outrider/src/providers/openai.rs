//! Any server speaking OpenAI's chat-completions wire format: OpenAI itself,
//! Ollama, vLLM, llama.cpp's server.
//!
//! The endpoint is operator configuration and trusted, unlike callback URLs,
//! so this client uses ordinary HTTP settings.

use super::{ChatRequest, Completion, Provider, ProviderError};
use crate::domain::{Message, ToolCall, ToolChoice};
use crate::tools;
use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The largest model response read, in bytes.
const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;

/// An OpenAI-compatible chat-completions client.
pub struct OpenAi {
    client: reqwest::Client,
    endpoint: String,
    api_key: Option<String>,
}

impl OpenAi {
    /// `base_url` is the API root, such as `https://api.openai.com/v1`.
    pub fn new(
        base_url: &str,
        api_key: Option<String>,
        timeout: Duration,
        tls: rustls::ClientConfig,
    ) -> reqwest::Result<Self> {
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(timeout)
            .build()?;
        Ok(Self {
            client,
            endpoint: format!("{}/chat/completions", base_url.trim_end_matches('/')),
            api_key,
        })
    }
}

#[async_trait]
impl Provider for OpenAi {
    async fn complete(&self, request: ChatRequest<'_>) -> Result<Completion, ProviderError> {
        let started = Instant::now();
        let mut call = self
            .client
            .post(&self.endpoint)
            .json(&request_body(&request));
        if let Some(key) = &self.api_key {
            call = call.bearer_auth(key);
        }
        let response = call
            .send()
            .await
            .map_err(|e| ProviderError::retryable(chain(&e)))?;

        let status = response.status();
        let bytes = read_limited(response).await?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(500)]).into_owned();
            let message = format!("model endpoint answered {status}: {text}");
            let retryable = status.as_u16() == 429 || status.is_server_error();
            let error = if retryable {
                ProviderError::retryable(message)
            } else {
                ProviderError::fatal(message)
            };
            return Err(error);
        }
        let reply: ChatResponse = serde_json::from_slice(&bytes)
            .map_err(|e| ProviderError::fatal(format!("unreadable model response: {e}")))?;
        into_completion(reply, started.elapsed())
    }
}

fn request_body(request: &ChatRequest<'_>) -> Value {
    let agent = request.agent;
    let messages: Vec<Value> = request.messages.iter().map(wire_message).collect();
    let mut body = json!({ "model": agent.model, "messages": messages });
    if !agent.tools.is_empty() {
        let specs: Vec<Value> = agent
            .tools
            .iter()
            .filter_map(|name| tools::find(name))
            .map(|tool| {
                json!({"type": "function", "function": {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": (tool.parameters)(),
                }})
            })
            .collect();
        body["tools"] = json!(specs);
        let choice = agent.tool_choice_at(request.step);
        if choice != ToolChoice::Auto {
            body["tool_choice"] = json!(choice.as_str());
        }
    }
    if let Some(temperature) = agent.temperature {
        body["temperature"] = json!(temperature);
    }
    if let Some(max_tokens) = agent.max_tokens {
        body["max_tokens"] = json!(max_tokens);
    }
    body
}

fn wire_message(message: &Message) -> Value {
    match message {
        Message::System { content } => json!({"role": "system", "content": content}),
        Message::User { content } => json!({"role": "user", "content": content}),
        Message::Assistant {
            content,
            tool_calls,
        } if tool_calls.is_empty() => {
            json!({"role": "assistant", "content": content})
        }
        Message::Assistant {
            content,
            tool_calls,
        } => {
            let calls: Vec<Value> = tool_calls
                .iter()
                .map(|call| {
                    json!({"id": call.id, "type": "function",
                           "function": {"name": call.name, "arguments": call.arguments}})
                })
                .collect();
            json!({"role": "assistant", "content": content, "tool_calls": calls})
        }
        Message::Tool {
            tool_call_id,
            content,
        } => {
            json!({"role": "tool", "tool_call_id": tool_call_id, "content": content})
        }
    }
}

#[derive(Deserialize)]
struct ChatResponse {
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Value>,
}

#[derive(Deserialize)]
struct Choice {
    message: WireMessage,
}

#[derive(Deserialize)]
struct WireMessage {
    content: Option<String>,
    #[serde(default)]
    tool_calls: Vec<WireToolCall>,
}

#[derive(Deserialize)]
struct WireToolCall {
    id: Option<String>,
    function: WireFunction,
}

#[derive(Deserialize)]
struct WireFunction {
    name: String,
    #[serde(default)]
    arguments: Option<Value>,
}

fn into_completion(reply: ChatResponse, took: Duration) -> Result<Completion, ProviderError> {
    let choice = reply
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| ProviderError::fatal("model response has no choices"))?;
    let tool_calls = choice
        .message
        .tool_calls
        .into_iter()
        .enumerate()
        .map(|(i, call)| ToolCall {
            id: call.id.unwrap_or_else(|| format!("call_{}", i + 1)),
            name: call.function.name,
            // Servers send a JSON string; some send the object itself.
            arguments: match call.function.arguments {
                Some(Value::String(text)) => text,
                Some(other) => other.to_string(),
                None => String::new(),
            },
        })
        .collect();
    let mut usage = reply.usage.unwrap_or_else(|| json!({}));
    if let Value::Object(map) = &mut usage {
        map.insert("duration_ms".into(), json!(took.as_millis() as u64));
    }
    Ok(Completion {
        content: choice.message.content,
        tool_calls,
        usage,
    })
}

async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, ProviderError> {
    let mut bytes = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| ProviderError::retryable(chain(&e)))?
    {
        if bytes.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(ProviderError::fatal("model response is too large"));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// An error with its causes, for messages that say what actually failed.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
