//! The HTTP API as a client sees it: status codes, JSON bodies and headers,
//! against the real binary.

mod support;

use reqwest::header::{HeaderMap, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::Duration;
use support::model::{FakeModel, ModelReply};
use support::server::Server;

const HOOK: &str = "https://example.com/hook";

/// A response as the tests look at it.
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

/// Sends raw bytes with optional `Authorization` value and extra headers.
async fn send(
    server: &Server,
    method: Method,
    path: &str,
    authorization: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Answer {
    let mut request = server.http.request(method, server.url(path));
    if let Some(value) = authorization {
        request = request.header(AUTHORIZATION, value);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if let Some(body) = body {
        request = request.header(CONTENT_TYPE, "application/json").body(body);
    }
    let response = request.send().await.expect("request reaches the server");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("response body");
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
    }
}

/// Sends a JSON body with the org's key and extra headers.
async fn post_with(
    server: &Server,
    path: &str,
    key: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> Answer {
    let bearer = format!("Bearer {key}");
    let bytes = serde_json::to_vec(body).expect("serialise");
    send(
        server,
        Method::POST,
        path,
        Some(&bearer),
        headers,
        Some(bytes),
    )
    .await
}

/// Sends raw bytes as the body of a POST with the org's key.
async fn post_raw(server: &Server, path: &str, key: &str, body: Vec<u8>) -> Answer {
    let bearer = format!("Bearer {key}");
    send(server, Method::POST, path, Some(&bearer), &[], Some(body)).await
}

fn interact_path(agent: &str) -> String {
    format!("/v1/agents/{agent}/interact")
}

fn session_path(session: &str) -> String {
    format!("/v1/agent-sessions/{session}")
}

fn events_path(session: &str) -> String {
    format!("/v1/agent-sessions/{session}/events")
}

/// Asserts a 400 whose error names `field`.
fn assert_field_error(status: u16, body: &Value, field: &str) {
    assert_eq!(status, 400, "{field}: {body}");
    assert_eq!(
        body["error"]["code"],
        json!("invalid_request"),
        "{field}: {body}"
    );
    assert_eq!(body["error"]["field"], json!(field), "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
}

/// Starts an interaction that answers 202 and returns its session id.
async fn accept(server: &Server, key: &str, agent: &str, extra: Value) -> String {
    let mut request = json!({"message": "hi", "callback_url": HOOK});
    if let (Some(request), Some(extra)) = (request.as_object_mut(), extra.as_object()) {
        request.extend(extra.clone());
    }
    let (status, body) = server.post(&interact_path(agent), key, request).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], json!("queued"));
    body["session_id"].as_str().expect("session_id").to_owned()
}

/// Runs an interaction synchronously and returns the 200 body.
async fn run(server: &Server, key: &str, agent: &str, message: &str) -> Value {
    let path = interact_path(agent);
    let (status, body) = server.post(&path, key, json!({"message": message})).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// A scripted agent that calls three tools, one per step, then answers.
async fn three_tool_agent(server: &Server, key: &str) -> String {
    let spec = json!({
        "name": "tools",
        "model_provider": "scripted",
        "tools": ["add", {"name": "echo"}, "current_time"],
        "script": [
            {"tool_calls": [{"name": "add", "arguments": {"numbers": [2, 3]}}]},
            {"tool_calls": [{"name": "echo", "arguments": {"text": "hello"}}]},
            {"tool_calls": [{"name": "current_time"}]},
            {"content": "all done"},
        ],
    });
    server.agent(key, spec).await
}

fn event_types(events: &Value) -> Vec<String> {
    events["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["type"].as_str().expect("type").to_owned())
        .collect()
}

#[tokio::test]
async fn an_agent_round_trips_through_create_show_replace_and_delete() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let spec = json!({
        "name": "helper",
        "model": "gpt-test",
        "system": "be brief",
        "max_steps": 4,
        "temperature": 0.5,
        "max_tokens": 256,
        "tools": ["echo", {"name": "add"}],
    });
    let (status, created) = server.post("/v1/agents", &key, spec).await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().expect("id").to_owned();
    assert_eq!(created["name"], json!("helper"));
    assert_eq!(created["model_provider"], json!("openai"));
    assert_eq!(created["tools"], json!(["echo", "add"]));

    let path = format!("/v1/agents/{id}");
    let (status, shown) = server.get(&path, &key).await;
    assert_eq!(status, 200);
    assert_eq!(shown, created);

    let replacement = json!({"name": "renamed", "model": "gpt-other"});
    let (status, replaced) = server
        .call(Method::PUT, &path, Some(&key), Some(replacement))
        .await;
    assert_eq!(status, 200, "{replaced}");
    assert_eq!(replaced["id"], json!(id));
    assert_eq!(replaced["name"], json!("renamed"));
    assert_eq!(replaced["model"], json!("gpt-other"));
    assert_eq!(
        replaced["max_steps"],
        json!(10),
        "omitted fields go back to defaults"
    );
    assert_eq!(replaced["tools"], json!([]));
    assert!(
        replaced.get("system").is_none_or(Value::is_null),
        "{replaced}"
    );
    assert!(replaced.get("temperature").is_none_or(Value::is_null));
    assert_eq!(replaced["created_at"], created["created_at"]);
    assert_eq!(server.get(&path, &key).await.1, replaced);

    let (status, _) = server.call(Method::DELETE, &path, Some(&key), None).await;
    assert_eq!(status, 204);
    let (status, body) = server.get(&path, &key).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], json!("not_found"));
    let (status, _) = server.call(Method::DELETE, &path, Some(&key), None).await;
    assert_eq!(status, 404);
    let replacement = json!({"name": "again"});
    let (status, _) = server
        .call(Method::PUT, &path, Some(&key), Some(replacement))
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn max_turns_is_accepted_as_another_name_for_max_steps() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;

    let (status, body) = server
        .post("/v1/agents", &key, json!({"name": "a", "max_turns": 7}))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["max_steps"], json!(7));
    assert_eq!(body["max_turns"], json!(7));

    let same = json!({"name": "b", "max_turns": 3, "max_steps": 3});
    let (status, body) = server.post("/v1/agents", &key, same).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["max_steps"], json!(3));

    let differing = json!({"name": "c", "max_turns": 3, "max_steps": 4});
    let (status, body) = server.post("/v1/agents", &key, differing).await;
    assert_field_error(status, &body, "max_steps");

    let (status, body) = server
        .post("/v1/agents", &key, json!({"name": "d", "max_turns": 101}))
        .await;
    assert_field_error(status, &body, "max_steps");

    // An agent as read, with one of the two names changed, is changed by it.
    let (_, read) = server.post("/v1/agents", &key, json!({"name": "e"})).await;
    let path = format!("/v1/agents/{}", read["id"].as_str().expect("id"));
    for (name, value) in [("max_turns", 4), ("max_steps", 6)] {
        let (_, mut agent) = server.get(&path, &key).await;
        agent[name] = json!(value);
        let (status, body) = server
            .call(Method::PUT, &path, Some(&key), Some(agent))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["max_steps"], json!(value), "{name}");
        assert_eq!(body["max_turns"], json!(value), "{name}");
    }
    // Both changed, to different values: which one is meant is unclear.
    let (_, mut agent) = server.get(&path, &key).await;
    agent["max_turns"] = json!(2);
    agent["max_steps"] = json!(3);
    let (status, body) = server
        .call(Method::PUT, &path, Some(&key), Some(agent))
        .await;
    assert_field_error(status, &body, "max_steps");
}

#[tokio::test]
async fn invalid_agent_fields_each_answer_400_naming_the_field() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let script = json!([{"content": "x"}]);
    let cases = [
        (json!({"max_steps": 0}), "max_steps"),
        (json!({"max_steps": 101}), "max_steps"),
        (json!({"max_steps": -1}), "max_steps"),
        (json!({"temperature": 3}), "temperature"),
        (json!({"temperature": -0.1}), "temperature"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"max_tokens": 32_769}), "max_tokens"),
        (json!({"tools": ["echo", "rm_rf"]}), "tools[1]"),
        (json!({"tools": ["echo", "echo"]}), "tools[1]"),
        (json!({"model_provider": "anthropic"}), "model_provider"),
        (json!({"model_provider": "scripted"}), "script"),
        (
            json!({"model_provider": "scripted", "script": [{}]}),
            "script[0]",
        ),
        (
            json!({"model_provider": "openai", "script": script}),
            "script",
        ),
        (json!({"script": script}), "script"),
        (json!({"name": 5}), "name"),
        (json!({"name": "   "}), "name"),
        (json!({"name": "n".repeat(201)}), "name"),
        (json!({"model": ""}), "model"),
        (json!({"tools": "echo"}), "tools"),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (
            json!({"tools": ["add"], "tool_choice": "always"}),
            "tool_choice",
        ),
        (
            json!({"model_provider": "local", "model": "llama-70b"}),
            "model",
        ),
    ];
    for (spec, field) in cases {
        let (status, body) = server.post("/v1/agents", &key, spec.clone()).await;
        assert_field_error(status, &body, field);
    }
    let (_, list) = server.get("/v1/agents", &key).await;
    assert_eq!(list["agents"], json!([]), "no agent was stored");
}

#[tokio::test]
async fn an_agent_without_a_provider_runs_locally_unless_its_model_is_another() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let cases = [
        (json!({}), "local", "smollm2-135m-instruct"),
        (
            json!({"model": "smollm2-135m-instruct"}),
            "local",
            "smollm2-135m-instruct",
        ),
        (json!({"model": "gpt-4o-mini"}), "openai", "gpt-4o-mini"),
        (json!({"model_provider": "openai"}), "openai", "gpt-4o-mini"),
    ];
    for (spec, provider, model) in cases {
        let (status, agent) = server.post("/v1/agents", &key, spec.clone()).await;
        assert_eq!(status, 201, "{spec}: {agent}");
        assert_eq!(agent["model_provider"], provider, "{spec}");
        assert_eq!(agent["model"], model, "{spec}");
        assert_eq!(agent["tool_choice"], "auto", "{spec}");
    }
}

#[tokio::test]
async fn an_agent_read_can_be_written_back_as_it_is() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let id = server.echo_agent(&key, "hi").await;
    let path = format!("/v1/agents/{id}");
    let (_, read) = server.get(&path, &key).await;

    let (status, written) = server
        .call(Method::PUT, &path, Some(&key), Some(read.clone()))
        .await;
    assert_eq!(status, 200, "{written}");
    assert_eq!(written["script"], read["script"]);

    let mut other = read.clone();
    other["id"] = json!("01937000-0000-7000-8000-000000000000");
    let (status, body) = server
        .call(Method::PUT, &path, Some(&key), Some(other))
        .await;
    assert_field_error(status, &body, "id");
    let (status, body) = server.post("/v1/agents", &key, read).await;
    assert_field_error(status, &body, "id");
}

#[tokio::test]
async fn invalid_replacements_answer_400_and_leave_the_agent_unchanged() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let id = server.echo_agent(&key, "hi").await;
    let path = format!("/v1/agents/{id}");
    let (_, before) = server.get(&path, &key).await;

    let bad = json!({"name": "x", "max_steps": 0});
    let (status, body) = server.call(Method::PUT, &path, Some(&key), Some(bad)).await;
    assert_field_error(status, &body, "max_steps");
    assert_eq!(server.get(&path, &key).await.1, before);
}

#[tokio::test]
async fn agents_are_listed_in_pages_that_follow_after() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let mut created = Vec::new();
    for n in 0..5 {
        created.push(server.echo_agent(&key, &format!("agent {n}")).await);
    }
    let other = server.org("other").api_key;
    server.echo_agent(&other, "not mine").await;

    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut path = "/v1/agents?limit=2".to_owned();
    loop {
        let (status, page) = server.get(&path, &key).await;
        assert_eq!(status, 200, "{page}");
        let agents = page["agents"].as_array().expect("agents");
        sizes.push(agents.len());
        seen.extend(
            agents
                .iter()
                .map(|a| a["id"].as_str().expect("id").to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/agents?limit=2&after={cursor}"),
            None => break,
        }
        assert!(sizes.len() < 10, "paging does not end");
    }
    assert_eq!(sizes, [2, 2, 1]);
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no agent twice: {seen:?}");
    let mut expected = created.clone();
    expected.sort();
    assert_eq!(seen, expected);

    let (_, all) = server.get("/v1/agents", &key).await;
    assert_eq!(all["agents"].as_array().map(Vec::len), Some(5));
    assert_eq!(all["next_cursor"], Value::Null);
}

#[tokio::test]
async fn a_full_last_page_of_agents_has_no_next_cursor() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    for n in 0..2 {
        server.echo_agent(&key, &format!("agent {n}")).await;
    }

    let (status, page) = server.get("/v1/agents?limit=2", &key).await;
    assert_eq!(status, 200);
    assert_eq!(page["agents"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        page["next_cursor"],
        Value::Null,
        "no more agents follow: {page}"
    );
}

#[tokio::test]
async fn a_bad_agent_list_limit_answers_400_naming_limit() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    for limit in ["0", "1001", "-1", "ten"] {
        let (status, body) = server.get(&format!("/v1/agents?limit={limit}"), &key).await;
        assert_field_error(status, &body, "limit");
    }
    let (status, _) = server.get("/v1/agents?limit=1000", &key).await;
    assert_eq!(status, 200);
    // A cursor that no page gave is refused, not answered with an empty page.
    for path in ["/v1/agents?after=garbage", "/v1/callbacks?after=zzz"] {
        let (status, body) = server.get(path, &key).await;
        assert_field_error(status, &body, "after");
    }
}

#[tokio::test]
async fn another_orgs_agent_cannot_be_read_replaced_deleted_or_run() {
    let server = Server::start(&[]);
    let owner = server.org("acme").api_key;
    let stranger = server.org("other").api_key;
    let id = server.echo_agent(&owner, "mine").await;
    let path = format!("/v1/agents/{id}");

    assert_eq!(server.get(&path, &stranger).await.0, 404);
    let spec = json!({"name": "stolen"});
    let (status, _) = server
        .call(Method::PUT, &path, Some(&stranger), Some(spec))
        .await;
    assert_eq!(status, 404);
    let (status, _) = server
        .call(Method::DELETE, &path, Some(&stranger), None)
        .await;
    assert_eq!(status, 404);
    let (status, body) = server
        .post(&interact_path(&id), &stranger, json!({"message": "hi"}))
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], json!("not_found"));

    let (status, body) = server.get(&path, &owner).await;
    assert_eq!(status, 200);
    assert_eq!(body["name"], json!("echo"), "the agent is untouched");
}

#[tokio::test]
async fn a_sync_interaction_with_a_scripted_agent_returns_its_output() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "hello back").await;

    let body = run(&server, &key, &agent, "hello").await;
    let session = body["session_id"].as_str().expect("session_id");
    assert_eq!(body["status"], json!("succeeded"));
    assert_eq!(body["output"], json!("hello back"));
    assert_eq!(body["error"], Value::Null);
    assert_eq!(body["events_url"], json!(server.url(&events_path(session))));

    let (status, state) = server.get(&session_path(session), &key).await;
    assert_eq!(status, 200);
    assert_eq!(state["id"], json!(session));
    assert_eq!(state["agent_id"], json!(agent));
    assert_eq!(state["status"], json!("succeeded"));
    assert_eq!(state["output"], json!("hello back"));
    assert_eq!(state["callback"], Value::Null);
    for stamp in ["created_at", "started_at", "completed_at"] {
        assert!(
            state[stamp].as_str().is_some_and(|s| s.ends_with('Z')),
            "{state}"
        );
    }
}

#[tokio::test]
async fn the_messages_list_form_is_accepted() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "listed").await;

    let request = json!({"messages": [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
    ]});
    let (status, body) = server.post(&interact_path(&agent), &key, request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], json!("succeeded"));
    assert_eq!(body["output"], json!("listed"));
}

#[tokio::test]
async fn malformed_messages_answer_400_naming_the_field() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "x").await;
    let path = interact_path(&agent);
    let cases = [
        (
            json!({"message": "a", "messages": [{"role": "user", "content": "b"}]}),
            "messages",
        ),
        (json!({}), "message"),
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": [{"role": "user", "content": " "}]}),
            "messages[0].content",
        ),
        (
            json!({"messages": [{"role": "robot", "content": "b"}]}),
            "messages[0].role",
        ),
        (json!({"messages": "hi"}), "messages"),
        (
            json!({"messages": [{"role": "system", "content": "be brief"}]}),
            "messages",
        ),
        (json!({"message": 42}), "message"),
        (json!({"message": "hi", "callback_url": 7}), "callback_url"),
        (
            json!({"message": "hi", "callback_url": "http://example.com/"}),
            "callback_url",
        ),
    ];
    for (request, field) in cases {
        let (status, body) = server.post(&path, &key, request).await;
        assert_field_error(status, &body, field);
    }
}

#[tokio::test]
async fn an_empty_or_blank_message_answers_400_naming_message() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "x").await;
    for message in ["", " ", "\n\t  "] {
        let (status, body) = server
            .post(&interact_path(&agent), &key, json!({"message": message}))
            .await;
        assert_field_error(status, &body, "message");
    }
}

#[tokio::test]
async fn a_message_over_100000_characters_answers_400() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "long read").await;
    let path = interact_path(&agent);

    let too_long = "a".repeat(100_001);
    let (status, body) = server.post(&path, &key, json!({"message": too_long})).await;
    assert_field_error(status, &body, "message");

    let listed = json!({"messages": [{"role": "user", "content": "a".repeat(100_001)}]});
    let (status, body) = server.post(&path, &key, listed).await;
    assert_field_error(status, &body, "messages[0].content");

    // The limit counts characters, not bytes.
    let at_limit = "\u{e9}".repeat(100_000);
    let (status, body) = server.post(&path, &key, json!({"message": at_limit})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["output"], json!("long read"));
}

#[tokio::test]
async fn more_than_100_messages_answer_400() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "many").await;
    let path = interact_path(&agent);
    let message = json!({"role": "user", "content": "hi"});

    let over = vec![message.clone(); 101];
    let (status, body) = server.post(&path, &key, json!({"messages": over})).await;
    assert_field_error(status, &body, "messages");

    let at_limit = vec![message; 100];
    let (status, body) = server
        .post(&path, &key, json!({"messages": at_limit}))
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn metadata_must_be_a_small_json_object() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "x").await;
    let path = interact_path(&agent);

    for metadata in [json!([1, 2]), json!("tag"), json!(3), json!(true)] {
        let request = json!({"message": "hi", "metadata": metadata});
        let (status, body) = server.post(&path, &key, request).await;
        assert_field_error(status, &body, "metadata");
    }
    let big = json!({"blob": "x".repeat(16 * 1024)});
    let (status, body) = server
        .post(&path, &key, json!({"message": "hi", "metadata": big}))
        .await;
    assert_field_error(status, &body, "metadata");

    let metadata = json!({"order": 7, "tags": ["a", "b"]});
    let request = json!({"message": "hi", "metadata": metadata});
    let (status, body) = server.post(&path, &key, request).await;
    assert_eq!(status, 200, "{body}");
    let session = body["session_id"].as_str().expect("session_id");
    let (_, state) = server.get(&session_path(session), &key).await;
    assert_eq!(state["metadata"], metadata);
}

#[tokio::test]
async fn metadata_of_exactly_16_kib_is_accepted_and_one_byte_more_is_not() {
    let server = Server::start(&["--workers", "0"]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "x").await;
    let path = interact_path(&agent);

    let overhead = json!({"blob": ""}).to_string().len();
    let at_limit = json!({"blob": "x".repeat(16 * 1024 - overhead)});
    assert_eq!(at_limit.to_string().len(), 16 * 1024);
    let request = json!({"message": "hi", "callback_url": HOOK, "metadata": at_limit});
    let (status, body) = server.post(&path, &key, request).await;
    assert_eq!(status, 202, "{body}");

    let over = json!({"blob": "x".repeat(16 * 1024 - overhead + 1)});
    let request = json!({"message": "hi", "callback_url": HOOK, "metadata": over});
    let (status, body) = server.post(&path, &key, request).await;
    assert_field_error(status, &body, "metadata");
}

#[tokio::test]
async fn a_callback_url_of_2048_characters_is_accepted_and_longer_ones_are_not() {
    let server = Server::start(&["--workers", "0"]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "x").await;
    let path = interact_path(&agent);
    let url = |path: String| format!("{HOOK}/{path}");

    let at_limit = url("a".repeat(2048 - HOOK.len() - 1));
    assert_eq!(at_limit.len(), 2048);
    let request = json!({"message": "hi", "callback_url": at_limit});
    let (status, body) = server.post(&path, &key, request).await;
    assert_eq!(status, 202, "{body}");

    // One character more; and 1,100 characters that percent-encode to
    // more than 6,000.
    for over in [url("a".repeat(2048 - HOOK.len())), url("é".repeat(1100))] {
        let request = json!({"message": "hi", "callback_url": over});
        let (status, body) = server.post(&path, &key, request).await;
        assert_field_error(status, &body, "callback_url");
    }
}

#[tokio::test]
async fn a_body_over_one_mebibyte_answers_413_with_a_json_error() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "x").await;

    let prefix = br#"{"message":""#;
    let suffix = br#""}"#;
    let mut body = prefix.to_vec();
    body.resize(1024 * 1024 + 1 - suffix.len(), b'a');
    body.extend_from_slice(suffix);
    assert_eq!(body.len(), 1024 * 1024 + 1);

    let answer = post_raw(&server, &interact_path(&agent), &key, body).await;
    assert_eq!(answer.status, 413, "{}", answer.body);
    assert_eq!(answer.body["error"]["code"], json!("payload_too_large"));
    assert!(answer.body["error"]["message"].is_string());
}

#[tokio::test]
async fn a_body_of_exactly_one_mebibyte_is_read_and_judged_by_its_fields() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "x").await;

    let prefix = br#"{"message":""#;
    let suffix = br#""}"#;
    let mut body = prefix.to_vec();
    body.resize(1024 * 1024 - suffix.len(), b'a');
    body.extend_from_slice(suffix);
    assert_eq!(body.len(), 1024 * 1024);

    let answer = post_raw(&server, &interact_path(&agent), &key, body).await;
    assert_field_error(answer.status, &answer.body, "message");
}

#[tokio::test]
async fn malformed_json_answers_400_invalid_json() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "x").await;
    let bodies: [&[u8]; 7] = [
        b"{\"message\": ",
        b"{message: 'hi'}",
        b"not json",
        b"[\"hi\"]",
        b"\"hi\"",
        // A list would otherwise fill an object's fields in order.
        b"[\"hi\", null, null, null]",
        b" []",
    ];
    for bytes in bodies {
        let answer = post_raw(&server, &interact_path(&agent), &key, bytes.to_vec()).await;
        let text = String::from_utf8_lossy(bytes);
        assert_eq!(answer.status, 400, "{text}: {}", answer.body);
        assert_eq!(
            answer.body["error"]["code"],
            json!("invalid_json"),
            "{text}"
        );
        let message = answer.body["error"]["message"].as_str().unwrap();
        assert!(!message.contains("struct"), "{text}: {message}");
    }
    let answer = post_raw(&server, "/v1/agents", &key, b"{\"name\": }".to_vec()).await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.body["error"]["code"], json!("invalid_json"));
}

#[tokio::test]
async fn trailing_bytes_after_the_json_body_answer_400_invalid_json() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "x").await;
    let bodies: [&[u8]; 3] = [
        b"{\"message\": \"hi\"} trailing",
        b"{\"message\": \"hi\"}{\"message\": \"again\"}",
        b"{\"message\": \"hi\"}}",
    ];
    for bytes in bodies {
        let answer = post_raw(&server, &interact_path(&agent), &key, bytes.to_vec()).await;
        let text = String::from_utf8_lossy(bytes);
        assert_eq!(answer.status, 400, "{text}: {}", answer.body);
        assert_eq!(
            answer.body["error"]["code"],
            json!("invalid_json"),
            "{text}"
        );
    }
    let answer = post_raw(&server, "/v1/agents", &key, b"{\"name\": \"a\"} x".to_vec()).await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    let (_, list) = server.get("/v1/agents", &key).await;
    assert_eq!(
        list["agents"].as_array().map(Vec::len),
        Some(1),
        "only the echo agent"
    );
}

#[tokio::test]
async fn an_empty_body_answers_400() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "x").await;
    for path in [interact_path(&agent), "/v1/agents".to_owned()] {
        let answer = post_raw(&server, &path, &key, Vec::new()).await;
        assert_eq!(answer.status, 400, "{path}: {}", answer.body);
        assert_eq!(
            answer.body["error"]["code"],
            json!("invalid_json"),
            "{path}"
        );
    }
}

#[tokio::test]
async fn interacting_with_an_unknown_agent_answers_404() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let path = interact_path("00000000-0000-0000-0000-000000000000");
    let (status, body) = server.post(&path, &key, json!({"message": "hi"})).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], json!("not_found"));

    let (status, body) = server.get("/v1/agents/no-such-agent", &key).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], json!("not_found"));
}

#[tokio::test]
async fn an_interaction_with_a_callback_answers_202_queued() {
    let server = Server::start(&["--workers", "0"]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "x").await;

    let request = json!({"message": "hi", "callback_url": HOOK, "metadata": {"n": 1}});
    let (status, body) = server.post(&interact_path(&agent), &key, request).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], json!("queued"));
    let session = body["session_id"].as_str().expect("session_id");
    assert_eq!(body["events_url"], json!(server.url(&events_path(session))));

    let (status, state) = server.get(&session_path(session), &key).await;
    assert_eq!(status, 200);
    assert_eq!(state["status"], json!("queued"));
    assert_eq!(state["callback_url"], json!(HOOK));
    assert_eq!(state["metadata"], json!({"n": 1}));
    assert_eq!(state["output"], Value::Null);
    assert_eq!(state["started_at"], Value::Null);
}

#[tokio::test]
async fn another_orgs_session_events_and_cancel_answer_404() {
    let server = Server::start(&["--workers", "0"]);
    let owner = server.org("acme").api_key;
    let stranger = server.org("other").api_key;
    let agent = server.echo_agent(&owner, "x").await;
    let session = accept(&server, &owner, &agent, json!({})).await;

    for path in [session_path(&session), events_path(&session)] {
        let (status, body) = server.get(&path, &stranger).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body["error"]["code"], json!("not_found"));
    }
    let cancel = format!("{}/cancel", session_path(&session));
    let (status, _) = server.post(&cancel, &stranger, json!({})).await;
    assert_eq!(status, 404);

    let (_, state) = server.get(&session_path(&session), &owner).await;
    assert_eq!(
        state["status"],
        json!("queued"),
        "the stranger cancelled nothing"
    );
}

#[tokio::test]
async fn requests_without_a_valid_key_answer_401_with_www_authenticate() {
    let server = Server::start(&[]);
    let org = server.org("acme");
    let wrong_secret = format!("{}x", org.api_key);
    let unknown_id = format!("ork_{}_{}", "0".repeat(16), "secret");
    let lower = format!("bearer {}", org.api_key);
    let bad_headers = [
        None,
        Some("Bearer ".to_owned()),
        Some("Bearer".to_owned()),
        Some(format!("Bearer {wrong_secret}")),
        Some(format!("Bearer {unknown_id}")),
        Some("Bearer not-a-key".to_owned()),
        Some(format!("Basic {}", org.api_key)),
        Some(org.api_key.clone()),
    ];
    for header in &bad_headers {
        for (method, path) in [(Method::GET, "/v1/agents"), (Method::POST, "/v1/agents")] {
            let body = (method == Method::POST).then(|| br#"{"name":"a"}"#.to_vec());
            let answer = send(&server, method, path, header.as_deref(), &[], body).await;
            assert_eq!(answer.status, 401, "{header:?} {path}: {}", answer.body);
            let challenge = answer.headers.get(WWW_AUTHENTICATE).map(|v| v.as_bytes());
            assert_eq!(challenge, Some(&b"Bearer"[..]), "{header:?}");
            assert_eq!(answer.body["error"]["code"], json!("unauthorized"));
        }
    }

    let answer = send(&server, Method::GET, "/v1/agents", Some(&lower), &[], None).await;
    assert_eq!(answer.status, 200, "the scheme is case-insensitive");
    let (_, list) = server.get("/v1/agents", &org.api_key).await;
    assert_eq!(
        list["agents"],
        json!([]),
        "no refused request created an agent"
    );
}

#[tokio::test]
async fn a_repeated_idempotency_key_returns_the_first_session() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "once").await;
    let path = interact_path(&agent);
    let request = json!({"message": "hi"});
    let headers = [("Idempotency-Key", "order-42")];

    let first = post_with(&server, &path, &key, &headers, &request).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let session = first.body["session_id"].as_str().expect("session_id");
    let again = post_with(&server, &path, &key, &headers, &request).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.body["session_id"], json!(session));
    assert_eq!(again.body["output"], json!("once"));

    let (_, events) = server.get(&events_path(session), &key).await;
    let kinds = event_types(&events);
    let starts = kinds.iter().filter(|k| *k == "session_start").count();
    let ends = kinds.iter().filter(|k| *k == "session_end").count();
    assert_eq!((starts, ends), (1, 1), "ran once: {kinds:?}");

    let other = [("Idempotency-Key", "order-43")];
    let third = post_with(&server, &path, &key, &other, &request).await;
    assert_eq!(third.status, 200);
    assert_ne!(third.body["session_id"], json!(session));
    let fourth = post_with(&server, &path, &key, &[], &request).await;
    assert_ne!(fourth.body["session_id"], json!(session));
    assert_ne!(fourth.body["session_id"], third.body["session_id"]);
}

#[tokio::test]
async fn a_repeated_idempotency_key_on_a_queued_session_creates_nothing_new() {
    let server = Server::start(&["--workers", "0"]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "x").await;
    let path = interact_path(&agent);
    let request = json!({"message": "hi", "callback_url": HOOK});
    let headers = [("Idempotency-Key", "k1")];

    let first = post_with(&server, &path, &key, &headers, &request).await;
    let second = post_with(&server, &path, &key, &headers, &request).await;
    assert_eq!((first.status, second.status), (202, 202));
    assert_eq!(first.body["session_id"], second.body["session_id"]);
    assert_eq!(first.body["events_url"], second.body["events_url"]);
    assert_eq!(second.body["status"], "queued");
}

#[tokio::test]
async fn a_repeated_idempotency_key_answers_with_the_sessions_current_status() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "x").await;
    let path = interact_path(&agent);
    let request = json!({"message": "hi", "callback_url": HOOK});
    let headers = [("Idempotency-Key", "k2")];

    let first = post_with(&server, &path, &key, &headers, &request).await;
    assert_eq!(first.status, 202, "{}", first.body);
    let session = first.body["session_id"].as_str().expect("session_id");
    server
        .wait_session(&key, session, Duration::from_secs(20), |s| {
            s["status"] == "succeeded"
        })
        .await;
    let again = post_with(&server, &path, &key, &headers, &request).await;
    assert_eq!(again.status, 202, "{}", again.body);
    assert_eq!(again.body["session_id"], json!(session));
    assert_eq!(again.body["status"], "succeeded");
}

#[tokio::test]
async fn concurrent_requests_with_one_idempotency_key_share_one_session() {
    let server = Server::start(&["--workers", "0"]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "x").await;
    let url = server.url(&interact_path(&agent));
    let request = json!({"message": "hi", "callback_url": HOOK});

    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let call = server
            .http
            .post(&url)
            .bearer_auth(&key)
            .header("Idempotency-Key", "burst")
            .json(&request);
        requests.spawn(async move {
            let response = call.send().await.expect("request reaches the server");
            let status = response.status().as_u16();
            let body: Value = response.json().await.expect("JSON body");
            (status, body)
        });
    }
    let mut sessions = HashSet::new();
    while let Some(joined) = requests.join_next().await {
        let (status, body) = joined.expect("request task");
        assert_eq!(status, 202, "{body}");
        sessions.insert(body["session_id"].as_str().expect("id").to_owned());
    }
    assert_eq!(sessions.len(), 1, "{sessions:?}");
}

#[tokio::test]
async fn idempotency_keys_are_scoped_to_one_org() {
    let server = Server::start(&["--workers", "0"]);
    let first = server.org("acme").api_key;
    let second = server.org("other").api_key;
    let headers = [("Idempotency-Key", "shared-key")];
    let request = json!({"message": "hi", "callback_url": HOOK});

    let mut sessions = Vec::new();
    for key in [&first, &second] {
        let agent = server.echo_agent(key, "x").await;
        let answer = post_with(&server, &interact_path(&agent), key, &headers, &request).await;
        assert_eq!(answer.status, 202, "{}", answer.body);
        sessions.push(answer.body["session_id"].as_str().expect("id").to_owned());
    }
    assert_ne!(sessions[0], sessions[1]);
    assert_eq!(
        server.get(&session_path(&sessions[1]), &second).await.0,
        200
    );
}

#[tokio::test]
async fn an_unusable_idempotency_key_answers_400() {
    let server = Server::start(&["--workers", "0"]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "x").await;
    let request = json!({"message": "hi", "callback_url": HOOK});
    let too_long = "k".repeat(256);
    for value in ["", too_long.as_str()] {
        let headers = [("Idempotency-Key", value)];
        let answer = post_with(&server, &interact_path(&agent), &key, &headers, &request).await;
        assert_field_error(answer.status, &answer.body, "Idempotency-Key");
    }
    let twice = [("Idempotency-Key", "k1"), ("Idempotency-Key", "k2")];
    let answer = post_with(&server, &interact_path(&agent), &key, &twice, &request).await;
    assert_field_error(answer.status, &answer.body, "Idempotency-Key");
    let at_limit = "k".repeat(255);
    let headers = [("Idempotency-Key", at_limit.as_str())];
    let answer = post_with(&server, &interact_path(&agent), &key, &headers, &request).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
}

#[tokio::test]
async fn events_page_in_order_without_gaps_or_repeats() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let agent = three_tool_agent(&server, &key).await;
    let body = run(&server, &key, &agent, "go").await;
    assert_eq!(body["status"], json!("succeeded"), "{body}");
    assert_eq!(body["output"], json!("all done"));
    let session = body["session_id"].as_str().expect("session_id");

    let mut seqs = Vec::new();
    let mut kinds = Vec::new();
    let mut path = format!("{}?limit=2", events_path(session));
    loop {
        let (status, page) = server.get(&path, &key).await;
        assert_eq!(status, 200, "{page}");
        let events = page["events"].as_array().expect("events");
        assert!(events.len() <= 2, "{page}");
        for event in events {
            seqs.push(event["seq"].as_i64().expect("seq"));
            kinds.push(event["type"].as_str().expect("type").to_owned());
            assert!(event["created_at"].is_string(), "{event}");
            assert!(event["data"].is_object(), "{event}");
        }
        match page["next_cursor"].as_i64() {
            Some(cursor) => {
                assert_eq!(Some(&cursor), seqs.last(), "the cursor is the last seq");
                path = format!("{}?limit=2&after={cursor}", events_path(session));
            }
            None => {
                assert_eq!(page["next_cursor"], Value::Null);
                break;
            }
        }
        assert!(seqs.len() < 100, "paging does not end");
    }
    assert!(seqs.len() >= 8, "{kinds:?}");
    let expected: Vec<i64> = (seqs[0]..seqs[0] + seqs.len() as i64).collect();
    assert_eq!(
        seqs, expected,
        "strictly increasing with no gaps or repeats"
    );
    assert_eq!(kinds.first().map(String::as_str), Some("session_start"));
    assert_eq!(kinds.last().map(String::as_str), Some("session_end"));
    let tools = kinds.iter().filter(|k| *k == "tool_call").count();
    assert_eq!(tools, 3, "{kinds:?}");

    let (_, all) = server.get(&events_path(session), &key).await;
    assert_eq!(all["events"].as_array().map(Vec::len), Some(seqs.len()));
    assert_eq!(all["next_cursor"], Value::Null);
    let add = all["events"]
        .as_array()
        .expect("events")
        .iter()
        .find(|e| e["type"] == "tool_call" && e["data"]["name"] == "add")
        .cloned()
        .expect("an add call");
    assert_eq!(add["data"]["result"], json!({"sum": 5.0}));
}

#[tokio::test]
async fn a_page_ending_at_the_last_event_has_no_next_cursor() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let agent = three_tool_agent(&server, &key).await;
    let body = run(&server, &key, &agent, "go").await;
    let session = body["session_id"].as_str().expect("session_id");

    let (_, all) = server.get(&events_path(session), &key).await;
    let events = all["events"].as_array().expect("events");
    let total = events.len();
    let last = events.last().expect("an event")["seq"]
        .as_i64()
        .expect("seq");

    let path = format!("{}?limit={total}", events_path(session));
    let (status, page) = server.get(&path, &key).await;
    assert_eq!(status, 200);
    assert_eq!(page["events"].as_array().map(Vec::len), Some(total));
    assert_eq!(page["next_cursor"], Value::Null);

    let path = format!("{}?after={last}", events_path(session));
    let (status, page) = server.get(&path, &key).await;
    assert_eq!(status, 200);
    assert_eq!(page, json!({"events": [], "next_cursor": null}));
}

#[tokio::test]
async fn bad_after_or_limit_on_events_answers_400_naming_the_field() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "x").await;
    let body = run(&server, &key, &agent, "go").await;
    let session = body["session_id"].as_str().expect("session_id");
    let base = events_path(session);

    for (query, field) in [
        ("after=abc", "after"),
        ("after=-1", "after"),
        ("after=1.5", "after"),
        ("after=", "after"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=abc", "limit"),
        ("limit=-5", "limit"),
    ] {
        let (status, body) = server.get(&format!("{base}?{query}"), &key).await;
        assert_field_error(status, &body, field);
    }
    for query in ["limit=1", "limit=1000", "after=0"] {
        let (status, body) = server.get(&format!("{base}?{query}"), &key).await;
        assert_eq!(status, 200, "{query}: {body}");
    }
    let bearer = format!("Bearer {key}");
    let resume = [("Last-Event-ID", "abc")];
    let answer = send(&server, Method::GET, &base, Some(&bearer), &resume, None).await;
    assert_field_error(answer.status, &answer.body, "Last-Event-ID");
}

#[tokio::test]
async fn cancelling_a_queued_session_ends_it_and_a_second_cancel_conflicts() {
    let server = Server::start(&["--workers", "0"]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "x").await;
    let session = accept(&server, &key, &agent, json!({})).await;
    let cancel = format!("{}/cancel", session_path(&session));

    let (status, body) = server.post(&cancel, &key, json!({})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["session_id"], json!(session));
    assert_eq!(body["status"], json!("cancelled"));

    let (_, state) = server.get(&session_path(&session), &key).await;
    assert_eq!(state["status"], json!("cancelled"));
    assert!(state["completed_at"].is_string(), "{state}");

    let (status, body) = server.post(&cancel, &key, json!({})).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], json!("conflict"));
}

#[tokio::test]
async fn a_finished_session_cannot_be_cancelled() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "x").await;
    let body = run(&server, &key, &agent, "go").await;
    let session = body["session_id"].as_str().expect("session_id");

    let cancel = format!("{}/cancel", session_path(session));
    let (status, body) = server.post(&cancel, &key, json!({})).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], json!("conflict"));
    let (_, state) = server.get(&session_path(session), &key).await;
    assert_eq!(state["status"], json!("succeeded"));
}

#[tokio::test]
async fn cancelling_an_unknown_session_answers_404() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let path = "/v1/agent-sessions/00000000-0000-0000-0000-000000000000/cancel";
    let (status, body) = server.post(path, &key, json!({})).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], json!("not_found"));
    let (status, _) = server.get(&session_path("nope"), &key).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_queued_session_survives_a_restart() {
    let mut server = Server::start(&["--workers", "0"]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "x").await;
    let metadata = json!({"ticket": "T-1"});
    let session = accept(&server, &key, &agent, json!({"metadata": metadata})).await;
    let (_, before) = server.get(&session_path(&session), &key).await;

    server.restart();

    let (status, after) = server.get(&session_path(&session), &key).await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["status"], json!("queued"));
    assert_eq!(after["metadata"], metadata);
    assert_eq!(after["agent_id"], json!(agent));
    assert_eq!(after["created_at"], before["created_at"]);
    let (status, events) = server.get(&events_path(&session), &key).await;
    assert_eq!(status, 200);
    assert_eq!(event_types(&events), ["session_start"]);
    assert_eq!(
        server.get(&format!("/v1/agents/{agent}"), &key).await.0,
        200
    );
}

#[tokio::test]
async fn a_sync_call_that_outlasts_the_sync_timeout_answers_with_the_session_still_queued() {
    let server = Server::start(&["--workers", "0", "--sync-timeout", "1s"]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "x").await;

    let body = run(&server, &key, &agent, "hi").await;
    assert_eq!(body["status"], json!("queued"), "{body}");
    assert_eq!(body["output"], Value::Null);
    let session = body["session_id"].as_str().expect("session_id");
    assert_eq!(server.get(&session_path(session), &key).await.0, 200);
}

#[tokio::test]
async fn a_tool_the_agent_was_not_given_is_recorded_as_a_tool_error() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let spec = json!({
        "name": "sneaky",
        "model_provider": "scripted",
        "tools": ["echo"],
        "script": [
            {"tool_calls": [{"name": "add", "arguments": {"numbers": [1]}}]},
            {"content": "tried"},
        ],
    });
    let agent = server.agent(&key, spec).await;
    let body = run(&server, &key, &agent, "go").await;
    assert_eq!(body["status"], json!("succeeded"), "{body}");
    let session = body["session_id"].as_str().expect("session_id");

    let (_, events) = server.get(&events_path(session), &key).await;
    let kinds = event_types(&events);
    assert!(kinds.contains(&"tool_error".to_owned()), "{kinds:?}");
    assert!(!kinds.contains(&"tool_call".to_owned()), "{kinds:?}");
}

#[tokio::test]
async fn a_scripted_agent_that_never_answers_fails_after_max_steps() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let spec = json!({
        "name": "loop",
        "model_provider": "scripted",
        "tools": ["echo"],
        "max_steps": 2,
        "script": [{"tool_calls": [{"name": "echo", "arguments": {"text": "again"}}]}],
    });
    let agent = server.agent(&key, spec).await;
    let body = run(&server, &key, &agent, "go").await;
    assert_eq!(body["status"], json!("failed"), "{body}");
    assert_eq!(body["output"], Value::Null);
    assert_eq!(body["error"]["code"], json!("EXECUTION_ERROR"));
}

#[tokio::test]
async fn a_deleted_agents_sessions_stay_readable() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "kept").await;
    let body = run(&server, &key, &agent, "go").await;
    let session = body["session_id"].as_str().expect("session_id");

    let path = format!("/v1/agents/{agent}");
    let (status, _) = server.call(Method::DELETE, &path, Some(&key), None).await;
    assert_eq!(status, 204);
    let (status, state) = server.get(&session_path(session), &key).await;
    assert_eq!(status, 200);
    assert_eq!(state["output"], json!("kept"));
    assert_eq!(server.get(&events_path(session), &key).await.0, 200);
}

#[tokio::test]
async fn events_urls_use_the_public_url_when_one_is_set() {
    let server = Server::start(&["--public-url", "https://outrider.example.com/"]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "x").await;

    let body = run(&server, &key, &agent, "hi").await;
    let session = body["session_id"].as_str().expect("session_id");
    let expected = format!("https://outrider.example.com{}", events_path(session));
    assert_eq!(body["events_url"], json!(expected));
    let (_, state) = server.get(&session_path(session), &key).await;
    assert_eq!(state["events_url"], json!(expected));
}

#[tokio::test]
async fn the_health_check_needs_no_key() {
    let server = Server::start(&[]);
    let answer = send(&server, Method::GET, "/healthz", None, &[], None).await;
    assert_eq!(answer.status, 200);
}

#[tokio::test]
async fn an_unknown_route_answers_a_json_404() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    for path in ["/v1/nothing", "/v2/agents", "/"] {
        let (status, body) = server.get(path, &key).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(body["error"]["code"], json!("not_found"), "{path}: {body}");
        assert!(body["error"]["message"].is_string());
    }
    let (status, body) = server.call(Method::GET, "/v1/nothing", None, None).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], json!("not_found"));
}

#[tokio::test]
async fn a_wrong_method_on_a_known_route_answers_405_with_a_json_error() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let bearer = format!("Bearer {key}");
    for (method, path) in [
        (Method::PATCH, "/v1/agents"),
        (Method::DELETE, "/v1/agents"),
        (Method::GET, "/v1/agents/x/interact"),
        (Method::GET, "/v1/agent-sessions/x/cancel"),
    ] {
        let answer = send(&server, method.clone(), path, Some(&bearer), &[], None).await;
        assert_eq!(answer.status, 405, "{method} {path}");
        assert!(answer.headers.get("allow").is_some(), "{method} {path}");
        assert!(
            answer.body["error"]["code"].is_string(),
            "{method} {path}: {}",
            answer.body
        );
    }
}

/// Reads a server-sent event stream to its end and returns its events as
/// (id, event, data) triples.
async fn read_stream(
    server: &Server,
    key: &str,
    path: &str,
    last_id: Option<&str>,
) -> Vec<(String, String, Value)> {
    let mut request = server
        .http
        .get(server.url(path))
        .bearer_auth(key)
        .header("Accept", "text/event-stream");
    if let Some(id) = last_id {
        request = request.header("Last-Event-ID", id);
    }
    let mut response = request.send().await.expect("stream request");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().expect("ascii");
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );

    let mut text = String::new();
    let read = async {
        while let Some(chunk) = response.chunk().await.expect("stream chunk") {
            text.push_str(std::str::from_utf8(&chunk).expect("utf-8"));
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("the stream ends");
    text.split("\n\n")
        .filter(|block| block.contains("data:"))
        .map(|block| {
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|line| line.strip_prefix(name))
                    .map(|v| v.trim().to_owned())
                    .unwrap_or_default()
            };
            let data = serde_json::from_str(&field("data:")).expect("data is JSON");
            (field("id:"), field("event:"), data)
        })
        .collect()
}

#[tokio::test]
async fn events_stream_live_until_the_session_ends_and_resume_after_last_event_id() {
    let slow = |reply| ModelReply::Delayed(Duration::from_millis(700), Box::new(reply));
    let model = FakeModel::start(vec![
        slow(ModelReply::ToolCall {
            name: "echo".into(),
            arguments: json!({"text": "x"}),
        }),
        slow(ModelReply::Text("done".into())),
    ])
    .await;
    let server = Server::start(&["--openai-base-url", &model.base_url()]);
    let org = server.org("acme");
    let spec = json!({"name": "slow", "model": "m", "tools": ["echo"]});
    let agent = server.agent(&org.api_key, spec).await;
    let (status, body) = server
        .post(
            &format!("/v1/agents/{agent}/interact"),
            &org.api_key,
            json!({"message": "hi", "callback_url": "https://example.com/h"}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let path = format!(
        "/v1/agent-sessions/{}/events",
        body["session_id"].as_str().expect("id")
    );

    // Opened while the first model call is still running.
    let events = read_stream(&server, &org.api_key, &path, None).await;
    let ids: Vec<String> = events.iter().map(|(id, _, _)| id.clone()).collect();
    let kinds: Vec<&str> = events.iter().map(|(_, kind, _)| kind.as_str()).collect();
    assert_eq!(ids, ["1", "2", "3", "4", "5", "6"]);
    assert_eq!(
        kinds,
        [
            "session_start",
            "llm_call",
            "tool_call",
            "llm_call",
            "message",
            "session_end"
        ]
    );
    assert_eq!(events[5].2["type"], json!("session_end"));
    assert_eq!(events[5].2["seq"], json!(6));

    let resumed = read_stream(&server, &org.api_key, &path, Some("4")).await;
    let ids: Vec<&str> = resumed.iter().map(|(id, _, _)| id.as_str()).collect();
    assert_eq!(ids, ["5", "6"]);
}

#[tokio::test]
async fn message_content_may_be_a_list_of_text_parts() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "ok").await;
    let parts = json!([{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]);
    let request = json!({"messages": [{"role": "user", "content": parts}]});
    let (status, body) = server.post(&interact_path(&agent), &key, request).await;
    assert_eq!(status, 200, "{body}");

    let path = format!(
        "/v1/agent-sessions/{}/events",
        body["session_id"].as_str().expect("id")
    );
    let (_, events) = server.get(&path, &key).await;
    let input = &events["events"][0]["data"]["input"][0];
    assert_eq!(input["content"], json!("first\nsecond"));

    let image = json!([{"type": "image_url", "text": "x"}]);
    let request = json!({"messages": [{"role": "user", "content": image}]});
    let (status, body) = server.post(&interact_path(&agent), &key, request).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["field"], json!("messages[0].content"));
}

#[tokio::test]
async fn unknown_fields_are_refused_by_name_instead_of_ignored() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "kept").await;

    let (status, body) = server
        .call(
            Method::PUT,
            &format!("/v1/agents/{agent}"),
            Some(&key),
            Some(json!({"nmae": "typo"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["field"], json!("nmae"));
    let (_, unchanged) = server.get(&format!("/v1/agents/{agent}"), &key).await;
    assert_eq!(unchanged["script"][0]["content"], json!("kept"));

    let request = json!({"message": "hi", "callbackUrl": "https://example.com/h"});
    let (status, body) = server.post(&interact_path(&agent), &key, request).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["field"], json!("callbackUrl"));
}

#[tokio::test]
async fn a_malformed_path_id_answers_a_json_400() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    for path in [
        "/v1/agents/%ff",
        "/v1/agent-sessions/%ff",
        "/v1/agent-sessions/%ff/events",
    ] {
        let (status, body) = server.get(path, &key).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["field"], json!("path"), "{path}");
    }
}

#[tokio::test]
async fn a_declared_length_over_the_limit_is_refused_before_the_body_is_sent() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let address = server.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let head = format!(
        "POST /v1/agents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: 999999999999\r\n\r\n"
    );
    stream
        .write_all(head.as_bytes())
        .await
        .expect("send the head");
    let mut answer = vec![0; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .expect("answered without waiting for the body")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer[..read]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::start(&["--header-timeout", "1s"]);
    let address = server.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("half a head");

    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the connection was still open after 5 s");

    // The server still answers others.
    let (status, _) = server.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn an_idempotency_key_reused_for_a_different_request_answers_422() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "once").await;
    let other_agent = server.echo_agent(&key, "twice").await;
    let headers = [("Idempotency-Key", "order-7")];

    let first = post_with(
        &server,
        &interact_path(&agent),
        &key,
        &headers,
        &json!({"message": "a"}),
    )
    .await;
    assert_eq!(first.status, 200, "{}", first.body);
    for (path, request) in [
        (interact_path(&agent), json!({"message": "b"})),
        (interact_path(&other_agent), json!({"message": "a"})),
        (
            interact_path(&agent),
            json!({"message": "a", "metadata": {"x": 1}}),
        ),
    ] {
        let reused = post_with(&server, &path, &key, &headers, &request).await;
        assert_eq!(reused.status, 422, "{request}: {}", reused.body);
        assert_eq!(
            reused.body["error"]["code"],
            json!("idempotency_key_reused")
        );
    }
    let repeat = post_with(
        &server,
        &interact_path(&agent),
        &key,
        &headers,
        &json!({"message": "a"}),
    )
    .await;
    assert_eq!(repeat.body["session_id"], first.body["session_id"]);
}

#[tokio::test]
async fn resuming_a_finished_sessions_stream_after_its_last_event_ends_at_once() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "done").await;
    let answer = post_with(
        &server,
        &interact_path(&agent),
        &key,
        &[],
        &json!({"message": "hi"}),
    )
    .await;
    assert_eq!(answer.body["status"], "succeeded", "{}", answer.body);
    let session = answer.body["session_id"].as_str().expect("session_id");
    let (_, page) = server.get(&events_path(session), &key).await;
    let last = page["events"]
        .as_array()
        .and_then(|events| events.last())
        .and_then(|event| event["seq"].as_i64())
        .expect("a last event");

    for cursor in [last.to_string(), "100000".to_owned()] {
        let started = std::time::Instant::now();
        let events = read_stream(&server, &key, &events_path(session), Some(&cursor)).await;
        assert!(events.is_empty(), "after {cursor}: {events:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "after {cursor} the stream took {:?} to end",
            started.elapsed()
        );
    }
    let events = read_stream(
        &server,
        &key,
        &events_path(session),
        Some(&(last - 1).to_string()),
    )
    .await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].1, "session_end");
}

#[tokio::test]
async fn a_body_that_stops_arriving_answers_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::start(&["--header-timeout", "1s"]);
    let key = server.org("acme").api_key;
    let address = server.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    let head = format!(
        "POST /v1/agents HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"name\":"
    );
    stream
        .write_all(head.as_bytes())
        .await
        .expect("send the head");

    let mut answer = Vec::new();
    let read = stream.read_to_end(&mut answer);
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the server answers and closes")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"request_timeout\""), "{answer}");
}

#[tokio::test]
async fn unknown_fields_in_a_script_are_refused() {
    let server = Server::start(&[]);
    let key = server.org("acme").api_key;
    for (script, field) in [
        (json!([{"content": "x", "bar": 1}]), "script[0].bar"),
        (
            json!([{"tool_calls": [{"name": "echo", "id": "c1"}]}]),
            "script[0].tool_calls[0].id",
        ),
    ] {
        let spec = json!({"model_provider": "scripted", "tools": ["echo"], "script": script});
        let (status, body) = server.post("/v1/agents", &key, spec).await;
        assert_field_error(status, &body, field);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_ends_event_streams_and_answers_waiting_calls() {
    let mut server = Server::start(&["--workers", "0"]);
    let key = server.org("acme").api_key;
    let agent = server.echo_agent(&key, "never runs").await;
    let path = interact_path(&agent);
    let queued = post_with(
        &server,
        &path,
        &key,
        &[],
        &json!({"message": "a", "callback_url": HOOK}),
    )
    .await;
    let session = queued.body["session_id"]
        .as_str()
        .expect("session_id")
        .to_owned();

    let stream = {
        let request = server
            .http
            .get(server.url(&events_path(&session)))
            .bearer_auth(&key)
            .header("Accept", "text/event-stream");
        tokio::spawn(async move {
            let mut response = request.send().await.expect("stream request");
            let mut text = String::new();
            while let Ok(Some(chunk)) = response.chunk().await {
                text.push_str(&String::from_utf8_lossy(&chunk));
            }
            text
        })
    };
    let waiting = {
        let request = server
            .http
            .post(server.url(&path))
            .bearer_auth(&key)
            .json(&json!({"message": "b"}));
        tokio::spawn(async move {
            let response = request.send().await.expect("sync request");
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.expect("JSON"))
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    let took = tokio::task::block_in_place(|| server.terminate(Duration::from_secs(8)));
    let took = took.expect("the server exits well within its 10 s drain");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let (status, body) = waiting.await.expect("joined");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "queued", "{body}");
    tokio::time::timeout(Duration::from_secs(5), stream)
        .await
        .expect("the stream ended")
        .expect("joined");
}
