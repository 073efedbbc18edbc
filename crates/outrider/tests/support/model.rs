//! A scripted stand-in for an OpenAI-compatible chat-completions endpoint.
//!
//! It serves plain HTTP on 127.0.0.1 and answers `POST /v1/chat/completions` with
//! non-streaming `chat.completion` objects taken from a script.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// One scripted answer of the fake model.
#[derive(Debug, Clone)]
pub enum ModelReply {
    /// An assistant message with this content; `finish_reason` is `stop`.
    Text(String),
    /// A single function call; `finish_reason` is `tool_calls`.
    ///
    /// `arguments` is sent JSON-encoded as a string. A `Value::String` is sent as is, so a
    /// test can hand the client arguments that are not valid JSON.
    ToolCall {
        /// Function name.
        name: String,
        /// Function arguments.
        arguments: Value,
    },
    /// An OpenAI-style error body with this HTTP status.
    Status(u16),
    /// The inner reply, sent after a pause (a slow model).
    Delayed(Duration, Box<ModelReply>),
}

/// A running fake model; the server stops when this is dropped.
pub struct FakeModel {
    addr: SocketAddr,
    shared: Shared,
    task: JoinHandle<()>,
}

impl FakeModel {
    /// Replies used in order, one per POST /v1/chat/completions; the last one repeats forever.
    ///
    /// Panics if `replies` is empty.
    pub async fn start(replies: Vec<ModelReply>) -> FakeModel {
        assert!(!replies.is_empty(), "FakeModel needs at least one reply");
        let shared = Shared::new(replies);
        let app = Router::new()
            .route("/v1/chat/completions", post(complete))
            .with_state(shared.clone());
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("read the bound address");
        let task = tokio::spawn(accept_loop(listener, app));
        FakeModel { addr, shared, task }
    }

    /// `http://127.0.0.1:{port}/v1`, the base URL an `OpenAI` client expects.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.addr.port())
    }

    /// The JSON request bodies received, in order.
    ///
    /// A body that is not JSON is recorded as a JSON string holding its text.
    pub fn calls(&self) -> Vec<Value> {
        self.shared
            .state()
            .calls
            .iter()
            .map(|call| call.body.clone())
            .collect()
    }

    /// The `Authorization` header of each call, in order.
    pub fn authorization(&self) -> Vec<Option<String>> {
        self.shared
            .state()
            .calls
            .iter()
            .map(|call| call.authorization.clone())
            .collect()
    }
}

impl Drop for FakeModel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct Shared(Arc<Mutex<ModelState>>);

struct ModelState {
    replies: Vec<ModelReply>,
    calls: Vec<Call>,
}

struct Call {
    body: Value,
    authorization: Option<String>,
}

impl Shared {
    fn new(replies: Vec<ModelReply>) -> Shared {
        Shared(Arc::new(Mutex::new(ModelState {
            replies,
            calls: Vec::new(),
        })))
    }

    fn state(&self) -> MutexGuard<'_, ModelState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores the call; returns its 1-based number and the reply scripted for it.
    fn record(&self, call: Call) -> (usize, ModelReply) {
        let mut state = self.state();
        state.calls.push(call);
        let number = state.calls.len();
        let index = (number - 1).min(state.replies.len() - 1);
        (number, state.replies[index].clone())
    }
}

/// Accepts connections until aborted; aborting also ends every open connection.
async fn accept_loop(listener: TcpListener, app: Router) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        while connections.try_join_next().is_some() {}
        connections.spawn(serve_connection(tcp, app.clone()));
    }
}

async fn serve_connection(tcp: TcpStream, app: Router) {
    let service = TowerToHyperService::new(app);
    // Clients that hang up mid-request are expected in tests; nothing to report.
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(tcp), service)
        .await;
}

async fn complete(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let request = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    let authorization = headers
        .get(AUTHORIZATION)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
    let call = Call {
        body: request.clone(),
        authorization,
    };
    let (number, mut reply) = shared.record(call);
    while let ModelReply::Delayed(pause, inner) = reply {
        tokio::time::sleep(pause).await;
        reply = *inner;
    }
    let choice = match reply {
        ModelReply::Status(code) => return error(code),
        ModelReply::Text(content) => text_choice(&content),
        ModelReply::ToolCall { name, arguments } => tool_call_choice(number, &name, arguments),
        ModelReply::Delayed(..) => unreachable!("delays are unwrapped above"),
    };
    Json(completion(&request, body.len(), number, &choice)).into_response()
}

/// The assistant message of one completion and what it is made of.
struct Choice {
    message: Value,
    finish_reason: &'static str,
    output_len: usize,
}

/// Builds a `chat.completion` object around one choice.
fn completion(request: &Value, request_len: usize, number: usize, choice: &Choice) -> Value {
    let model = request
        .get("model")
        .cloned()
        .unwrap_or_else(|| json!("fake-model"));
    json!({
        "id": format!("chatcmpl-fake{number}"),
        "object": "chat.completion",
        "created": unix_now(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": choice.message,
            "finish_reason": choice.finish_reason,
        }],
        "usage": usage(request_len, choice.output_len),
    })
}

fn text_choice(content: &str) -> Choice {
    let output_len = content.len();
    let message = json!({ "role": "assistant", "content": content });
    Choice {
        message,
        finish_reason: "stop",
        output_len,
    }
}

fn tool_call_choice(number: usize, name: &str, arguments: Value) -> Choice {
    let arguments = match arguments {
        Value::String(raw) => raw,
        other => other.to_string(),
    };
    let output_len = name.len() + arguments.len();
    let call = json!({
        "id": format!("call_{number}"),
        "type": "function",
        "function": { "name": name, "arguments": arguments },
    });
    let message = json!({ "role": "assistant", "content": null, "tool_calls": [call] });
    Choice {
        message,
        finish_reason: "tool_calls",
        output_len,
    }
}

/// Rough token counts: one token per four bytes, at least one.
fn usage(request_len: usize, output_len: usize) -> Value {
    let prompt = (request_len / 4).max(1);
    let completion = (output_len / 4).max(1);
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

fn error(code: u16) -> Response {
    let status = StatusCode::from_u16(code).expect("scripted reply uses a valid status code");
    let (kind, error_code) = match code {
        401 => ("invalid_request_error", Some("invalid_api_key")),
        429 => ("requests", Some("rate_limit_exceeded")),
        500..=599 => ("server_error", None),
        _ => ("invalid_request_error", None),
    };
    let body = json!({
        "error": {
            "message": format!("fake model error: {status}"),
            "type": kind,
            "param": null,
            "code": error_code,
        }
    });
    (status, Json(body)).into_response()
}

fn unix_now() -> u64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH);
    since_epoch.expect("system clock is after 1970").as_secs()
}
