//! The embedded local model, run for real: the default model answering a
//! prompt, tool calls held to their schemas by constrained decoding, the
//! first start on an empty database, and what happens when the model is
//! missing.
//!
//! The model is fetched once, with `outrider model pull`, into
//! `$OUTRIDER_MODELS_DIR` (CI points it at a cache kept between runs) or
//! else the default models directory.

mod support;

use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;
use support::receiver::{assert_signed, Receiver};
use support::server::{binary, Server};

/// Long enough for a short reply on a slow machine, model load included.
const WAIT: Duration = Duration::from_secs(180);
const MODEL: &str = "smollm2-135m-instruct";

/// The models directory holding the default model, pulled on first use.
fn models_dir() -> &'static str {
    static DIR: OnceLock<String> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::var("OUTRIDER_MODELS_DIR")
            .ok()
            .filter(|dir| !dir.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(outrider::providers::local::models::default_models_dir);
        let output = Command::new(binary())
            .args(["model", "pull", MODEL, "--models-dir"])
            .arg(&dir)
            .output()
            .expect("run outrider model pull");
        assert!(output.status.success(), "model pull failed: {output:?}");
        dir.to_str().expect("utf-8 models dir").to_owned()
    })
}

/// A server with the model in place that may call `receiver`.
fn server_with_model(receiver: &Receiver) -> Server {
    let ca = receiver.ca_file().to_str().expect("utf-8 path").to_owned();
    let args = ["--callback-allow", "127.0.0.0/8", "--callback-ca-file", &ca];
    Server::start_with_env(&args, &[("OUTRIDER_MODELS_DIR", models_dir())])
}

async fn events(server: &Server, key: &str, session: &str) -> Vec<Value> {
    let path = format!("/v1/agent-sessions/{session}/events?limit=1000");
    let (status, body) = server.get(&path, key).await;
    assert_eq!(status, 200, "{body}");
    body["events"].as_array().expect("events").clone()
}

fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

async fn wait_ended(server: &Server, key: &str, session: &str) -> Value {
    server
        .wait_session(key, session, WAIT, |s| {
            !matches!(s["status"].as_str(), Some("queued" | "running"))
        })
        .await
}

#[tokio::test]
async fn the_default_model_answers_a_real_prompt_and_the_callback_is_signed() {
    let receiver = Receiver::start(vec![]).await;
    let server = server_with_model(&receiver);
    let org = server.org("acme");

    // An agent that names no provider runs on the local default model.
    let (status, agent) = server
        .post(
            "/v1/agents",
            &org.api_key,
            json!({"name": "helper", "max_tokens": 48}),
        )
        .await;
    assert_eq!(status, 201, "{agent}");
    assert_eq!(agent["model_provider"], "local");
    assert_eq!(agent["model"], MODEL);
    let agent = agent["id"].as_str().expect("id");

    let request = json!({
        "message": "What is the capital of France? Answer in one sentence.",
        "callback_url": receiver.url("/hook"),
    });
    let path = format!("/v1/agents/{agent}/interact");
    let (status, accepted) = server.post(&path, &org.api_key, request).await;
    assert_eq!(status, 202, "{accepted}");
    let session = accepted["session_id"].as_str().expect("session_id");

    let callback = receiver.wait_for(1, WAIT).await.remove(0);
    assert_signed(&callback, &org.signing_secret);
    let body: Value = serde_json::from_slice(&callback.body).expect("JSON body");
    assert_eq!(body["status"], "succeeded", "{body}");
    let output = body["output"].as_str().expect("output");
    assert!(!output.trim().is_empty(), "the answer is empty: {body}");

    let events = events(&server, &org.api_key, session).await;
    let calls = of_type(&events, "llm_call");
    assert_eq!(calls.len(), 1, "{events:?}");
    let usage = &calls[0]["data"]["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 10, "{usage}");
    let generated = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=48).contains(&generated), "{usage}");
    assert!(usage["time_to_first_token_ms"].is_u64(), "{usage}");
    assert!(usage["tokens_per_second"].is_number(), "{usage}");
    assert_eq!(of_type(&events, "message")[0]["data"]["content"], output);
}

/// Checks a call against the built-in tool's schema, as written in
/// `tools.rs`, without using the server's own code.
fn assert_fits_schema(name: &str, arguments: &str) {
    let arguments: Value = serde_json::from_str(arguments)
        .unwrap_or_else(|e| panic!("{name} arguments are not JSON ({e}): {arguments}"));
    let object = arguments.as_object().expect("arguments are an object");
    match name {
        "add" => {
            assert_eq!(object.len(), 1, "only numbers: {arguments}");
            let numbers = object["numbers"].as_array().expect("numbers is a list");
            assert!(numbers.iter().all(Value::is_number), "{arguments}");
        }
        "echo" => {
            assert_eq!(object.len(), 1, "only text: {arguments}");
            assert!(object["text"].is_string(), "{arguments}");
        }
        other => panic!("a call to {other:?}, which the agent does not have"),
    }
}

#[tokio::test]
async fn every_tool_call_the_local_model_makes_fits_the_tools_schema() {
    let receiver = Receiver::start(vec![]).await;
    let server = server_with_model(&receiver);
    let key = server.org("acme").api_key;

    // "required" makes the first reply a call, so the grammar is surely
    // exercised; a high temperature gives the sampler every chance to
    // stray. Several sessions, for several samples.
    let agent = server
        .agent(
            &key,
            json!({"name": "tools", "tools": ["add", "echo"], "tool_choice": "required",
                   "temperature": 1.5, "max_steps": 3, "max_tokens": 96}),
        )
        .await;
    let path = format!("/v1/agents/{agent}/interact");
    for _ in 0..3 {
        let message = json!({"message": "Add 17 and 25, then repeat the word done."});
        let (status, accepted) = server.post(&path, &key, message).await;
        assert_eq!(status, 200, "{accepted}");
        let session = accepted["session_id"].as_str().expect("session_id");
        let ended = wait_ended(&server, &key, session).await;

        let events = events(&server, &key, session).await;
        let first = of_type(&events, "llm_call")[0]["data"]["message"]["tool_calls"].as_array();
        assert!(first.is_some_and(|calls| !calls.is_empty()), "{events:?}");
        assert_every_call_fits(&events);
        assert_answered_or_out_of_steps(&ended);
    }
}

#[tokio::test]
async fn a_required_call_cut_short_by_max_tokens_fails_and_is_not_an_answer() {
    let receiver = Receiver::start(vec![]).await;
    let server = server_with_model(&receiver);
    let key = server.org("acme").api_key;
    let path = |agent: &str| format!("/v1/agents/{agent}/interact");
    for max_tokens in [1, 3] {
        let agent = server
            .agent(
                &key,
                json!({"name": "tools", "tools": ["add"], "tool_choice": "required",
                       "max_steps": 2, "max_tokens": max_tokens}),
            )
            .await;
        let message = json!({"message": "Add 2 and 3."});
        let (status, answer) = server.post(&path(&agent), &key, message).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["status"], "failed", "{answer}");
        assert_eq!(answer["error"]["code"], "MODEL_ERROR", "{answer}");
        let said = answer["error"]["message"].as_str().expect("message");
        assert!(said.contains("middle of a tool call"), "{said}");
    }
}

/// Every call the model made fits its tool's schema and ran as a
/// `tool_call`, none as a `tool_error`.
fn assert_every_call_fits(events: &[Value]) {
    let mut calls = 0;
    for step in of_type(events, "llm_call") {
        let made = step["data"]["message"]["tool_calls"].as_array();
        for call in made.into_iter().flatten() {
            let name = call["name"].as_str().expect("name");
            assert_fits_schema(name, call["arguments"].as_str().expect("arguments"));
            calls += 1;
        }
    }
    assert!(of_type(events, "tool_error").is_empty(), "{events:?}");
    assert_eq!(of_type(events, "tool_call").len(), calls);
}

/// A tool-using session either answered or kept calling until it ran out
/// of steps; nothing else can end it.
fn assert_answered_or_out_of_steps(ended: &Value) {
    match ended["status"].as_str() {
        Some("succeeded") => assert!(ended["output"].is_string(), "{ended}"),
        _ => assert_eq!(ended["error"]["code"], "EXECUTION_ERROR", "{ended}"),
    }
}

#[tokio::test]
async fn with_tools_optional_the_local_model_answers_or_calls_validly() {
    let receiver = Receiver::start(vec![]).await;
    let server = server_with_model(&receiver);
    let key = server.org("acme").api_key;
    let agent = server
        .agent(
            &key,
            json!({"name": "calculator", "tools": ["add"], "max_steps": 4, "max_tokens": 64,
                   "system": "Use the add tool for sums, then give the result."}),
        )
        .await;
    let path = format!("/v1/agents/{agent}/interact");
    let (status, answer) = server
        .post(&path, &key, json!({"message": "What is 2 + 3?"}))
        .await;
    assert_eq!(status, 200, "{answer}");
    let session = answer["session_id"].as_str().expect("session_id");
    let ended = wait_ended(&server, &key, session).await;

    let events = events(&server, &key, session).await;
    assert_every_call_fits(&events);
    assert_answered_or_out_of_steps(&ended);
}

#[tokio::test]
async fn a_conversation_longer_than_the_local_context_fails_at_once_saying_so() {
    let receiver = Receiver::start(vec![]).await;
    let server = server_with_model(&receiver);
    let key = server.org("acme").api_key;
    let agent = server.agent(&key, json!({"name": "a"})).await;

    let long = "The quick brown fox jumps over the lazy dog. ".repeat(250);
    let path = format!("/v1/agents/{agent}/interact");
    let started = std::time::Instant::now();
    let (status, answer) = server.post(&path, &key, json!({"message": long})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "failed", "{answer}");
    assert_eq!(answer["error"]["code"], "MODEL_ERROR", "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("fewer than 2048"), "{message}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "not tried again"
    );
}

#[tokio::test]
async fn eight_sessions_at_once_share_the_model_and_all_succeed() {
    let receiver = Receiver::start(vec![]).await;
    let server = server_with_model(&receiver);
    let key = server.org("acme").api_key;
    let agent = server
        .agent(&key, json!({"name": "short", "max_tokens": 24}))
        .await;

    let path = format!("/v1/agents/{agent}/interact");
    let asks = (0..8).map(|i| {
        let body = json!({"message": format!("Name a colour. ({i})")});
        server.post(&path, &key, body)
    });
    let answers = futures_util::future::join_all(asks).await;
    for (status, answer) in answers {
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["status"], "succeeded", "{answer}");
        assert!(!answer["output"].as_str().unwrap().is_empty(), "{answer}");
    }
}

#[tokio::test]
async fn a_first_start_creates_an_assistant_that_answers_with_the_printed_key() {
    let receiver = Receiver::start(vec![]).await;
    let mut server = server_with_model(&receiver);
    let banner = server.wait_stdout("curl", Duration::from_secs(10));
    let printed = |label: &str| -> String {
        let line = banner.lines().find(|l| l.trim_start().starts_with(label));
        let line = line.unwrap_or_else(|| panic!("no {label} in {banner}"));
        line.split_whitespace().last().unwrap().to_owned()
    };
    let (key, agent) = (printed("api key:"), printed("agent id:"));

    // The same credentials are kept beside the database, for the owner only.
    let file = server.dir().join("outrider.credentials.json");
    let kept: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(kept["api_key"], key.as_str());
    assert_eq!(kept["agent_id"], agent.as_str());
    assert_eq!(kept["signing_secret"], printed("signing secret:").as_str());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let (status, shown) = server.get(&format!("/v1/agents/{agent}"), &key).await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["name"], "assistant");
    assert_eq!(shown["model_provider"], "local");
    let path = format!("/v1/agents/{agent}/interact");
    let message = json!({"message": "What is the capital of France?"});
    let (status, answer) = server.post(&path, &key, message).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "succeeded", "{answer}");
    assert!(!answer["output"].as_str().unwrap().trim().is_empty());

    // A second start finds the organisation and prints nothing new.
    server.restart();
    let later = server.wait_stdout("api key", Duration::from_secs(2));
    assert!(!later.contains("api key"), "{later}");
}

#[tokio::test]
async fn a_missing_model_that_cannot_be_fetched_fails_sessions_with_model_unavailable() {
    let empty = tempfile::tempdir().unwrap();
    let models = empty.path().to_str().unwrap();
    // Fetching is on, but there is no Python to fetch with.
    let env = [
        ("OUTRIDER_MODELS_DIR", models),
        ("OUTRIDER_PYTHON", "/nonexistent/python3"),
    ];
    let server = Server::start_with_env(&["--model-pull", "on"], &env);
    let key = server.org("acme").api_key;
    let agent = server.agent(&key, json!({"name": "a"})).await;

    let path = format!("/v1/agents/{agent}/interact");
    for _ in 0..2 {
        let (status, answer) = server.post(&path, &key, json!({"message": "hi"})).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["status"], "failed", "{answer}");
        assert_eq!(answer["error"]["code"], "MODEL_UNAVAILABLE", "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains("outrider model pull"), "{message}");
    }
    let (status, _) = server
        .call(reqwest::Method::GET, "/healthz", None, None)
        .await;
    assert_eq!(status, 200, "the server keeps serving");
    assert_eq!(std::fs::read_dir(empty.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn with_fetching_off_a_missing_model_is_reported_as_not_installed() {
    let empty = tempfile::tempdir().unwrap();
    let env = [("OUTRIDER_MODELS_DIR", empty.path().to_str().unwrap())];
    let server = Server::start_with_env(&[], &env);
    let key = server.org("acme").api_key;
    let agent = server.agent(&key, json!({"name": "a"})).await;

    let path = format!("/v1/agents/{agent}/interact");
    let (_, answer) = server.post(&path, &key, json!({"message": "hi"})).await;
    assert_eq!(answer["error"]["code"], "MODEL_UNAVAILABLE", "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("not installed"), "{message}");
    assert!(message.contains("--model-pull"), "{message}");
}

#[test]
fn model_pull_twice_verifies_the_file_in_place_and_fetches_nothing() {
    let dir = models_dir();
    let output = Command::new(binary())
        .args(["model", "pull", "--models-dir", dir])
        .output()
        .expect("run outrider model pull");
    assert!(output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("already present, verified"), "{stderr}");
    let path = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let size = std::fs::metadata(&path).expect("the printed path").len();
    assert_eq!(size, 98_362_432);

    let list = Command::new(binary())
        .args(["model", "list", "--models-dir", dir])
        .output()
        .expect("run outrider model list");
    let line: Value = serde_json::from_slice(&list.stdout).expect("a JSON line");
    assert_eq!(line["name"], MODEL);
    assert_eq!(line["installed"], true);
}

#[test]
fn pulling_an_unknown_model_names_the_known_ones() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(binary())
        .args(["model", "pull", "gpt-5", "--models-dir"])
        .arg(dir.path())
        .output()
        .expect("run outrider model pull");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(MODEL), "{stderr}");
}
