//! Domain types shared by every part: agents, sessions, messages, events.
//!
//! Values here are already checked: the API parses requests into them once,
//! and the rest of the server trusts them.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch; every stored time uses this.
pub type Millis = i64;

/// The current time in milliseconds since the Unix epoch.
pub fn now_ms() -> Millis {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock is after 1970");
    since.as_millis() as Millis
}

/// Formats a stored time as RFC 3339 (UTC, millisecond precision).
pub fn rfc3339(ms: Millis) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    at.format(&format).expect("a UTC time always formats")
}

/// A new identifier: a UUIDv7, so identifiers sort by creation time.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Which model back end an agent runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelProvider {
    /// A small model run inside the server process.
    Local,
    /// Any OpenAI-compatible chat-completions server.
    Openai,
    /// Replies listed in the agent definition; no model at all.
    Scripted,
}

/// One scripted model reply: text, tool calls, or both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptedReply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ScriptedToolCall>,
}

/// A tool call in a scripted reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptedToolCall {
    pub name: String,
    #[serde(default = "empty_object")]
    pub arguments: Value,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

/// What an agent is: its model, prompt, limits and tools.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentSpec {
    pub name: String,
    pub model_provider: ModelProvider,
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    pub max_steps: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub tools: Vec<String>,
    #[serde(default)]
    pub tool_choice: ToolChoice,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub script: Vec<ScriptedReply>,
}

impl AgentSpec {
    /// The tool choice for one step. `Required` holds for the first step
    /// only, as agent tooling built on OpenAI's API resets it: an agent made
    /// to call a tool on every step could never give its answer.
    pub fn tool_choice_at(&self, step: u32) -> ToolChoice {
        match self.tool_choice {
            ToolChoice::Required if step > 1 => ToolChoice::Auto,
            choice => choice,
        }
    }
}

/// Whether a model call may, must or must not call a tool (OpenAI's
/// `tool_choice`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolChoice {
    /// The model decides.
    #[default]
    Auto,
    /// The first step's reply is a tool call; later steps are `Auto`.
    Required,
    /// No reply is a tool call.
    None,
}

impl ToolChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Required => "required",
            Self::None => "none",
        }
    }
}

/// A stored agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Agent {
    pub id: String,
    pub org_id: String,
    pub spec: AgentSpec,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// Where a session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl SessionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// A session's error, as clients and callbacks see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionError {
    pub code: String,
    pub message: String,
}

impl SessionError {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_owned(),
            message: message.into(),
        }
    }
}

/// Who wrote a conversation message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    System,
    User,
    Assistant,
}

/// A message the client sent to start a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputMessage {
    pub role: Role,
    pub content: String,
}

/// A tool call the model asked for. `arguments` is the JSON text as the model
/// wrote it; it is parsed only when the tool runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// One entry of the conversation the model sees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Message {
    System {
        content: String,
    },
    User {
        content: String,
    },
    Assistant {
        content: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tool_calls: Vec<ToolCall>,
    },
    Tool {
        tool_call_id: String,
        content: String,
    },
}

impl From<&InputMessage> for Message {
    fn from(input: &InputMessage) -> Self {
        let content = input.content.clone();
        match input.role {
            Role::System => Message::System { content },
            Role::User => Message::User { content },
            Role::Assistant => Message::Assistant {
                content: Some(content),
                tool_calls: Vec::new(),
            },
        }
    }
}

/// A stored session.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub id: String,
    pub org_id: String,
    pub agent_id: String,
    pub agent: AgentSpec,
    pub status: SessionStatus,
    pub input: Vec<InputMessage>,
    pub metadata: Option<Value>,
    pub callback_url: Option<String>,
    pub output: Option<String>,
    pub error: Option<SessionError>,
    pub created_at: Millis,
    pub started_at: Option<Millis>,
    pub completed_at: Option<Millis>,
    /// How many times a worker has claimed it (more than one after a crash).
    pub claims: u32,
}

/// The kinds of event a session records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    SessionStart,
    LlmCall,
    ToolCall,
    ToolError,
    Message,
    SessionEnd,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SessionStart => "session_start",
            Self::LlmCall => "llm_call",
            Self::ToolCall => "tool_call",
            Self::ToolError => "tool_error",
            Self::Message => "message",
            Self::SessionEnd => "session_end",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "session_start" => Self::SessionStart,
            "llm_call" => Self::LlmCall,
            "tool_call" => Self::ToolCall,
            "tool_error" => Self::ToolError,
            "message" => Self::Message,
            "session_end" => Self::SessionEnd,
            _ => return None,
        })
    }
}

/// One recorded step of a session.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub seq: i64,
    pub kind: EventKind,
    pub data: Value,
    pub created_at: Millis,
}
