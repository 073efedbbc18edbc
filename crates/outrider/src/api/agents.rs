//! `/v1/agents`: create, list, show, replace and delete agents.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;

use super::auth::Org;
use super::{
    page, page_after, page_limit, ApiError, ApiResult, AppState, Id, JsonBody, JsonResponse,
};
use crate::domain::{
    new_id, now_ms, rfc3339, Agent, AgentSpec, ModelProvider, ScriptedReply, ToolChoice,
};
use crate::providers::local::models;
use crate::tools;

/// Bounds on what an agent definition may hold.
pub const MAX_NAME_CHARS: usize = 200;
pub const MAX_SYSTEM_CHARS: usize = 100_000;
pub const MAX_STEPS: u32 = 100;
pub const DEFAULT_STEPS: u32 = 10;
pub const MAX_TOKENS: u32 = 32_768;
pub const MAX_SCRIPT_REPLIES: usize = 1_000;

/// An agent definition as clients send it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRequest {
    name: Option<String>,
    model_provider: Option<ModelProvider>,
    model: Option<String>,
    system: Option<String>,
    max_steps: Option<u32>,
    /// Scout's name for `max_steps`.
    max_turns: Option<u32>,
    temperature: Option<f64>,
    max_tokens: Option<u32>,
    #[serde(default)]
    tools: Vec<ToolRef>,
    tool_choice: Option<ToolChoice>,
    #[serde(default)]
    script: Vec<ScriptedReply>,
    /// Read-only fields of an agent as it is shown, taken so that an agent
    /// read can be written back as it is; `id` must be the agent's own.
    id: Option<String>,
    #[serde(rename = "created_at")]
    _created_at: Option<IgnoredAny>,
    #[serde(rename = "updated_at")]
    _updated_at: Option<IgnoredAny>,
}

/// A tool named by a string or by an object with a `name`.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a tool's name, or an object with its \"name\"")]
enum ToolRef {
    Name(String),
    Object { name: String },
}

impl AgentRequest {
    /// Checks every field and fills in defaults; `existing` is the agent
    /// being replaced, `None` when one is created.
    fn into_spec(self, existing: Option<&Agent>) -> ApiResult<AgentSpec> {
        if let Some(given) = &self.id {
            match existing {
                Some(agent) if agent.id == *given => {}
                Some(_) => return Err(ApiError::field("id", "differs from the agent's id")),
                None => return Err(ApiError::field("id", "is given by the server")),
            }
        }
        let name = self.name.unwrap_or_else(|| "agent".to_owned());
        check_length("name", &name, 1, MAX_NAME_CHARS)?;
        if let Some(system) = &self.system {
            check_length("system", system, 0, MAX_SYSTEM_CHARS)?;
        }
        let provider = self
            .model_provider
            .unwrap_or_else(|| implied_provider(self.model.as_deref()));
        let model = self
            .model
            .unwrap_or_else(|| default_model(provider).to_owned());
        check_length("model", &model, 1, MAX_NAME_CHARS)?;
        if provider == ModelProvider::Local && models::find(&model).is_none() {
            let known = models::names().join(", ");
            let message = format!("unknown local model {model:?}; local models: {known}");
            return Err(ApiError::field("model", message));
        }

        let max_steps = match (self.max_steps, self.max_turns) {
            // An agent as shown carries both; a client that knows only
            // one of the names changes that one and sends both back.
            (Some(steps), Some(turns)) if steps != turns => {
                match existing.map(|agent| agent.spec.max_steps) {
                    Some(current) if current == steps => turns,
                    Some(current) if current == turns => steps,
                    _ => return Err(ApiError::field("max_steps", "differs from max_turns")),
                }
            }
            (steps, turns) => steps.or(turns).unwrap_or(DEFAULT_STEPS),
        };
        if !(1..=MAX_STEPS).contains(&max_steps) {
            let message = format!("must be from 1 to {MAX_STEPS}");
            return Err(ApiError::field("max_steps", message));
        }
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ApiError::field("temperature", "must be from 0 to 2"));
            }
        }
        if let Some(tokens) = self.max_tokens {
            if !(1..=MAX_TOKENS).contains(&tokens) {
                let message = format!("must be from 1 to {MAX_TOKENS}");
                return Err(ApiError::field("max_tokens", message));
            }
        }

        let tools = self
            .tools
            .into_iter()
            .map(ToolRef::into_name)
            .collect::<Vec<_>>();
        check_tools(&tools)?;
        let tool_choice = self.tool_choice.unwrap_or_default();
        if tool_choice == ToolChoice::Required && tools.is_empty() {
            let message = "\"required\" needs at least one tool";
            return Err(ApiError::field("tool_choice", message));
        }
        check_script(provider, &self.script)?;
        Ok(AgentSpec {
            name,
            model_provider: provider,
            model,
            system: self.system,
            max_steps,
            temperature: self.temperature,
            max_tokens: self.max_tokens,
            tools,
            tool_choice,
            script: self.script,
        })
    }
}

impl ToolRef {
    fn into_name(self) -> String {
        match self {
            Self::Name(name) | Self::Object { name } => name,
        }
    }
}

/// The provider of an agent that names none: the local model unless
/// `model` names another, which is then taken for an OpenAI-compatible one.
fn implied_provider(model: Option<&str>) -> ModelProvider {
    match model {
        Some(model) if models::find(model).is_none() => ModelProvider::Openai,
        _ => ModelProvider::Local,
    }
}

fn default_model(provider: ModelProvider) -> &'static str {
    match provider {
        ModelProvider::Local => models::DEFAULT_MODEL,
        ModelProvider::Openai => "gpt-4o-mini",
        ModelProvider::Scripted => "scripted",
    }
}

fn check_length(field: &str, value: &str, min: usize, max: usize) -> ApiResult<()> {
    let chars = value.chars().count();
    if value.trim().is_empty() && min > 0 {
        return Err(ApiError::field(field, "must not be empty"));
    }
    if chars > max {
        return Err(ApiError::field(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    Ok(())
}

fn check_tools(tools: &[String]) -> ApiResult<()> {
    for (i, name) in tools.iter().enumerate() {
        if tools::find(name).is_none() {
            let known = tools::names().join(", ");
            let message = format!("unknown tool {name:?}; available tools: {known}");
            return Err(ApiError::field(format!("tools[{i}]"), message));
        }
        if tools[..i].contains(name) {
            return Err(ApiError::field(format!("tools[{i}]"), "listed twice"));
        }
    }
    Ok(())
}

fn check_script(provider: ModelProvider, script: &[ScriptedReply]) -> ApiResult<()> {
    match provider {
        ModelProvider::Scripted if script.is_empty() => Err(ApiError::field(
            "script",
            "a scripted agent needs at least one reply",
        )),
        ModelProvider::Scripted if script.len() > MAX_SCRIPT_REPLIES => Err(ApiError::field(
            "script",
            format!("must hold at most {MAX_SCRIPT_REPLIES} replies"),
        )),
        ModelProvider::Scripted => {
            for (i, reply) in script.iter().enumerate() {
                if reply.content.is_none() && reply.tool_calls.is_empty() {
                    let message = "needs content, tool_calls or both";
                    return Err(ApiError::field(format!("script[{i}]"), message));
                }
            }
            Ok(())
        }
        _ if !script.is_empty() => Err(ApiError::field(
            "script",
            "only agents with model_provider \"scripted\" take a script",
        )),
        _ => Ok(()),
    }
}

/// The JSON shape of an agent in responses.
pub fn agent_json(agent: &Agent) -> Value {
    let mut body = serde_json::to_value(&agent.spec).expect("agent specs serialise");
    body["id"] = json!(agent.id);
    body["max_turns"] = json!(agent.spec.max_steps);
    body["created_at"] = json!(rfc3339(agent.created_at));
    body["updated_at"] = json!(rfc3339(agent.updated_at));
    body
}

pub async fn create(
    State(state): State<AppState>,
    org: Org,
    JsonBody(request): JsonBody<AgentRequest>,
) -> ApiResult<JsonResponse> {
    let spec = request.into_spec(None)?;
    let now = now_ms();
    let agent = Agent {
        id: new_id(),
        org_id: org.id,
        spec,
        created_at: now,
        updated_at: now,
    };
    state.store.insert_agent(&agent).await?;
    tracing::info!(agent.id = %agent.id, org.id = %agent.org_id, "agent created");
    Ok((StatusCode::CREATED, Json(agent_json(&agent))))
}

pub async fn list(
    State(state): State<AppState>,
    org: Org,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let limit = page_limit(query.get("limit").map(String::as_str), 100, 1000)?;
    let after = page_after(query.get("after").map(String::as_str))?;
    let rows = state.store.agents(&org.id, after, limit + 1).await?;
    let (agents, next_cursor) = page(rows, limit, |a| a.id.clone(), agent_json);
    Ok(Json(
        json!({ "agents": agents, "next_cursor": next_cursor }),
    ))
}

pub async fn show(
    State(state): State<AppState>,
    org: Org,
    Id(agent_id): Id,
) -> ApiResult<Json<Value>> {
    let agent = state.store.agent(&org.id, &agent_id).await?;
    let agent = agent.ok_or(ApiError::NotFound("agent"))?;
    Ok(Json(agent_json(&agent)))
}

pub async fn replace(
    State(state): State<AppState>,
    org: Org,
    Id(agent_id): Id,
    JsonBody(request): JsonBody<AgentRequest>,
) -> ApiResult<Json<Value>> {
    let existing = state.store.agent(&org.id, &agent_id).await?;
    let mut agent = existing.ok_or(ApiError::NotFound("agent"))?;
    agent.spec = request.into_spec(Some(&agent))?;
    agent.updated_at = now_ms();
    if !state.store.update_agent(&agent).await? {
        return Err(ApiError::NotFound("agent"));
    }
    Ok(Json(agent_json(&agent)))
}

pub async fn delete(
    State(state): State<AppState>,
    org: Org,
    Id(agent_id): Id,
) -> ApiResult<StatusCode> {
    if state.store.delete_agent(&org.id, &agent_id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound("agent"))
    }
}
