//! Callbacks end to end: the real server, a real HTTPS receiver, and a model
//! endpoint speaking the OpenAI wire format.

mod support;

use base64::Engine;
use serde_json::{json, Value};
use std::time::Duration;
use support::model::{FakeModel, ModelReply};
use support::receiver::{assert_signed, hmac_b64, Receiver, Recorded, Reply};
use support::server::Server;

const WAIT: Duration = Duration::from_secs(20);

/// A server that may call the receiver: loopback allowed, its CA trusted.
fn server_for(receiver: &Receiver, extra: &[&str]) -> Server {
    let ca = receiver.ca_file().to_str().expect("utf-8 path").to_owned();
    let mut args = vec![
        "--callback-allow",
        "127.0.0.0/8,::1",
        "--callback-ca-file",
        &ca,
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn body_of(request: &Recorded) -> Value {
    serde_json::from_slice(&request.body).expect("callback body is JSON")
}

async fn interact(server: &Server, key: &str, agent: &str, body: Value) -> String {
    let path = format!("/v1/agents/{agent}/interact");
    let (status, answer) = server.post(&path, key, body).await;
    assert_eq!(status, 202, "{answer}");
    assert!(answer["events_url"]
        .as_str()
        .expect("events_url")
        .ends_with("/events"));
    answer["session_id"]
        .as_str()
        .expect("session_id")
        .to_owned()
}

#[tokio::test]
async fn a_finished_session_posts_a_signed_callback() {
    let receiver = Receiver::start(vec![]).await;
    let model = FakeModel::start(vec![
        ModelReply::ToolCall {
            name: "add".into(),
            arguments: json!({"numbers": [2, 3]}),
        },
        ModelReply::Text("the sum is 5".into()),
    ])
    .await;
    let server = server_for(&receiver, &["--openai-base-url", &model.base_url()]);
    let org = server.org("acme");
    let agent = server
        .agent(
            &org.api_key,
            json!({"name": "calc", "model": "m", "tools": ["add"]}),
        )
        .await;

    let request = json!({"message": "add 2 and 3", "callback_url": receiver.url("/hook")});
    let session = interact(&server, &org.api_key, &agent, request).await;
    let requests = receiver.wait_for(1, WAIT).await;

    let callback = &requests[0];
    assert_eq!(callback.method, "POST");
    assert_eq!(callback.path, "/hook");
    assert_eq!(callback.header("content-type"), Some("application/json"));
    assert_signed(callback, &org.signing_secret);
    let body = body_of(callback);
    assert_eq!(body["session_id"], json!(session));
    assert_eq!(body["status"], json!("succeeded"));
    assert_eq!(body["output"], json!("the sum is 5"));
    assert!(uuid::Uuid::parse_str(body["callback_event_id"].as_str().expect("id")).is_ok());
    let completed = body["completed_at"].as_str().expect("completed_at");
    assert!(
        time::OffsetDateTime::parse(completed, &time::format_description::well_known::Rfc3339)
            .is_ok()
    );
    let events_url = body["events_url"].as_str().expect("events_url");
    assert_eq!(
        events_url,
        server.url(&format!("/v1/agent-sessions/{session}/events"))
    );
    assert!(body.get("error").is_none());

    // The model saw the tool result before answering.
    let calls = model.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["tools"][0]["function"]["name"], json!("add"));
    let last = calls[1]["messages"]
        .as_array()
        .expect("messages")
        .last()
        .cloned();
    assert_eq!(last.expect("a tool message")["role"], json!("tool"));

    // Events are readable with the key, hidden from another org, refused without a key.
    let (status, events) = server
        .get(
            &format!("/v1/agent-sessions/{session}/events"),
            &org.api_key,
        )
        .await;
    assert_eq!(status, 200);
    let kinds: Vec<&str> = events["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["type"].as_str().expect("type"))
        .collect();
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
    let other = server.org("other");
    let path = format!("/v1/agent-sessions/{session}/events");
    assert_eq!(server.get(&path, &other.api_key).await.0, 404);
    assert_eq!(
        server.call(reqwest::Method::GET, &path, None, None).await.0,
        401
    );

    let state = server
        .wait_session(&org.api_key, &session, WAIT, |s| {
            s["callback"]["status"] == "succeeded"
        })
        .await;
    assert_eq!(state["callback"]["attempts"], json!(1));
    assert_eq!(
        state["callback"]["callback_event_id"],
        body["callback_event_id"]
    );
}

#[tokio::test]
async fn an_agent_that_never_stops_calling_tools_fails_after_max_steps() {
    let receiver = Receiver::start(vec![]).await;
    let model = FakeModel::start(vec![ModelReply::ToolCall {
        name: "echo".into(),
        arguments: json!({"text": "again"}),
    }])
    .await;
    let server = server_for(&receiver, &["--openai-base-url", &model.base_url()]);
    let org = server.org("acme");
    let spec = json!({"name": "loop", "model": "m", "tools": ["echo"], "max_steps": 3});
    let agent = server.agent(&org.api_key, spec).await;

    let request = json!({"message": "go", "callback_url": receiver.url("/hook")});
    interact(&server, &org.api_key, &agent, request).await;
    let requests = receiver.wait_for(1, WAIT).await;

    assert_signed(&requests[0], &org.signing_secret);
    let body = body_of(&requests[0]);
    assert_eq!(body["status"], json!("failed"));
    assert_eq!(
        body["error"],
        json!({"code": "EXECUTION_ERROR", "message": "Agent exceeded maximum step count"})
    );
    assert_eq!(model.calls().len(), 3, "no model call after the last step");
}

#[tokio::test]
async fn a_required_tool_choice_is_sent_for_the_first_step_only() {
    let receiver = Receiver::start(vec![]).await;
    let model = FakeModel::start(vec![
        ModelReply::ToolCall {
            name: "add".into(),
            arguments: json!({"numbers": [17, 25]}),
        },
        ModelReply::Text("42".into()),
    ])
    .await;
    let server = server_for(&receiver, &["--openai-base-url", &model.base_url()]);
    let org = server.org("acme");
    let spec = json!({"name": "sum", "model": "m", "tools": ["add"], "tool_choice": "required"});
    let agent = server.agent(&org.api_key, spec).await;

    let path = format!("/v1/agents/{agent}/interact");
    let (status, answer) = server
        .post(&path, &org.api_key, json!({"message": "17 + 25?"}))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "succeeded", "{answer}");
    assert_eq!(answer["output"], "42");
    let calls = model.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["tool_choice"], "required");
    assert_eq!(calls[1].get("tool_choice"), None, "auto is the default");
}

#[tokio::test]
async fn a_callback_is_retried_after_503s_with_the_same_bytes_and_fresh_signatures() {
    let receiver = Receiver::start(vec![Reply::Status(503), Reply::Status(503)]).await;
    let server = server_for(&receiver, &[]);
    let org = server.org("acme");
    let agent = server.echo_agent(&org.api_key, "done").await;

    let request = json!({"message": "go", "callback_url": receiver.url("/hook")});
    let session = interact(&server, &org.api_key, &agent, request).await;
    let requests = receiver.wait_for(3, WAIT).await;

    let first = body_of(&requests[0]);
    let mut stamps = Vec::new();
    for request in &requests {
        assert_eq!(
            request.body, requests[0].body,
            "identical bytes on every attempt"
        );
        assert_eq!(
            body_of(request)["callback_event_id"],
            first["callback_event_id"]
        );
        stamps.push(assert_signed(request, &org.signing_secret));
    }
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "{stamps:?}");
    assert!(
        stamps[2] > stamps[0],
        "signed fresh on each attempt: {stamps:?}"
    );

    let state = server
        .wait_session(&org.api_key, &session, WAIT, |s| {
            s["callback"]["status"] == "succeeded"
        })
        .await;
    assert_eq!(state["callback"]["attempts"], json!(3));
    assert_eq!(state["callback"]["last_status_code"], json!(200));
}

#[tokio::test]
async fn a_400_ends_delivery_after_one_attempt() {
    let receiver = Receiver::start(vec![Reply::Status(400)]).await;
    let server = server_for(&receiver, &[]);
    let org = server.org("acme");
    let agent = server.echo_agent(&org.api_key, "done").await;

    let request = json!({"message": "go", "callback_url": receiver.url("/hook")});
    let session = interact(&server, &org.api_key, &agent, request).await;
    let state = server
        .wait_session(&org.api_key, &session, WAIT, |s| {
            s["callback"]["status"] == "failed"
        })
        .await;

    assert_eq!(state["callback"]["attempts"], json!(1));
    assert_eq!(state["callback"]["last_status_code"], json!(400));
    assert_eq!(state["callback"]["next_attempt_at"], Value::Null);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(receiver.requests().len(), 1);
}

#[tokio::test]
async fn a_redirect_is_not_followed() {
    let elsewhere = Receiver::start(vec![]).await;
    let receiver = Receiver::start(vec![Reply::Redirect(elsewhere.url("/stolen"))]).await;
    let server = server_for(&receiver, &[]);
    let org = server.org("acme");
    let agent = server.echo_agent(&org.api_key, "done").await;

    let request = json!({"message": "go", "callback_url": receiver.url("/hook")});
    let session = interact(&server, &org.api_key, &agent, request).await;
    let state = server
        .wait_session(&org.api_key, &session, WAIT, |s| {
            s["callback"]["status"] == "failed"
        })
        .await;

    assert_eq!(state["callback"]["last_status_code"], json!(302));
    assert_eq!(receiver.requests().len(), 1);
    assert!(
        elsewhere.requests().is_empty(),
        "the redirect target was never contacted"
    );
}

#[tokio::test]
async fn non_ascii_and_nested_bodies_verify_byte_for_byte() {
    let receiver = Receiver::start(vec![]).await;
    let server = server_for(&receiver, &[]);
    let org = server.org("acme");
    let text = "caf\u{e9} \u{2028} \u{2029} \u{1f600} \"quoted\" \\ </script>";
    let agent = server.echo_agent(&org.api_key, text).await;

    let metadata = json!({"order": {"id": 7, "lines": [{"sku": "\u{e9}t\u{e9}", "qty": 2}]},
                          "note": "line\u{2028}separator"});
    let request = json!({
        "message": "hi",
        "callback_url": receiver.ip_url("/hook?x=1"),
        "metadata": metadata,
    });
    interact(&server, &org.api_key, &agent, request).await;
    let requests = receiver.wait_for(1, WAIT).await;

    assert_eq!(requests[0].path, "/hook?x=1");
    assert_signed(&requests[0], &org.signing_secret);
    let body = body_of(&requests[0]);
    assert_eq!(body["output"], json!(text));
    assert_eq!(body["metadata"], metadata);
}

#[tokio::test]
async fn a_server_killed_after_accepting_still_delivers_after_restart() {
    let receiver = Receiver::start(vec![]).await;
    let slow = ModelReply::Delayed(
        Duration::from_secs(3),
        Box::new(ModelReply::Text("late".into())),
    );
    let model = FakeModel::start(vec![slow]).await;
    let mut server = server_for(&receiver, &["--openai-base-url", &model.base_url()]);
    let org = server.org("acme");
    let agent = server
        .agent(&org.api_key, json!({"name": "slow", "model": "m"}))
        .await;

    let request = json!({"message": "go", "callback_url": receiver.url("/hook")});
    let session = interact(&server, &org.api_key, &agent, request).await;
    // Killed while the model call is in flight.
    tokio::time::timeout(WAIT, async {
        while model.calls().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the model was called");
    server.kill();
    assert!(receiver.requests().is_empty());

    server.restart();
    let requests = receiver.wait_for(1, WAIT).await;
    assert_signed(&requests[0], &org.signing_secret);
    assert_eq!(body_of(&requests[0])["session_id"], json!(session));
    assert_eq!(body_of(&requests[0])["status"], json!("succeeded"));
    assert_eq!(body_of(&requests[0])["output"], json!("late"));
}

#[tokio::test]
async fn a_server_killed_while_a_retry_waits_retries_after_restart() {
    let receiver = Receiver::start(vec![Reply::Status(503)]).await;
    let mut server = server_for(&receiver, &["--retry-schedule", "3s"]);
    let org = server.org("acme");
    let agent = server.echo_agent(&org.api_key, "done").await;

    let request = json!({"message": "go", "callback_url": receiver.url("/hook")});
    let session = interact(&server, &org.api_key, &agent, request).await;
    server
        .wait_session(&org.api_key, &session, WAIT, |s| {
            s["callback"]["attempts"] == 1
        })
        .await;
    server.kill();

    server.restart();
    let requests = receiver.wait_for(2, WAIT).await;
    assert_eq!(requests[1].body, requests[0].body);
    assert_signed(&requests[1], &org.signing_secret);
    let state = server
        .wait_session(&org.api_key, &session, WAIT, |s| {
            s["callback"]["status"] == "succeeded"
        })
        .await;
    assert_eq!(state["callback"]["attempts"], json!(2));
}

#[tokio::test]
async fn private_and_plain_http_callback_urls_are_refused_at_accept() {
    let server = Server::start(&[]);
    let org = server.org("acme");
    let agent = server.echo_agent(&org.api_key, "done").await;
    let path = format!("/v1/agents/{agent}/interact");

    for url in [
        "http://example.com/hook",
        "https://127.0.0.1/",
        "https://[::ffff:127.0.0.1]/",
        "https://2130706433/",
        "https://0x7f.1/",
        "https://[::]/",
        "https://localhost/",
        "https://10.0.0.1/",
        "https://169.254.169.254/latest/meta-data",
        "https://user:pass@example.com/",
        "ftp://example.com/",
        "not a url",
    ] {
        let (status, body) = server
            .post(
                &path,
                &org.api_key,
                json!({"message": "hi", "callback_url": url}),
            )
            .await;
        assert_eq!(status, 400, "{url}: {body}");
        assert_eq!(
            body["error"]["field"],
            json!("callback_url"),
            "{url}: {body}"
        );
        assert!(body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("callback_url"));
    }
    let (_, events) = server.get("/v1/agents", &org.api_key).await;
    assert_eq!(events["agents"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn a_429_is_retried_no_sooner_than_its_retry_after() {
    let busy = Reply::WithHeaders(429, vec![("retry-after", "3".to_owned())]);
    let receiver = Receiver::start(vec![busy, Reply::Status(408)]).await;
    let server = server_for(&receiver, &[]);
    let org = server.org("acme");
    let agent = server.echo_agent(&org.api_key, "done").await;

    let request = json!({"message": "go", "callback_url": receiver.url("/hook")});
    let session = interact(&server, &org.api_key, &agent, request).await;
    let requests = receiver.wait_for(3, WAIT).await;

    let waited = requests[1]
        .at
        .duration_since(requests[0].at)
        .expect("in order");
    assert!(
        waited >= Duration::from_millis(2900),
        "retried after {waited:?}"
    );
    let state = server
        .wait_session(&org.api_key, &session, WAIT, |s| {
            s["callback"]["status"] == "succeeded"
        })
        .await;
    assert_eq!(
        state["callback"]["attempts"],
        json!(3),
        "the 408 was retried too"
    );
}

/// A session's delivery attempts, as the operator endpoint lists them.
async fn attempts_of(server: &Server, key: &str, session: &str) -> Vec<Value> {
    let (status, body) = server
        .get(&format!("/v1/agent-sessions/{session}/callback"), key)
        .await;
    assert_eq!(status, 200, "{body}");
    body["attempt_log"].as_array().expect("attempt_log").clone()
}

#[tokio::test]
async fn a_503s_retry_after_lengthens_the_wait_and_garbage_in_it_is_ignored() {
    let later = Reply::WithHeaders(503, vec![("retry-after", "3".to_owned())]);
    let garbage = Reply::WithHeaders(503, vec![("retry-after", "soon-ish".to_owned())]);
    let now = Reply::WithHeaders(503, vec![("retry-after", "0".to_owned())]);
    let receiver = Receiver::start(vec![later, garbage, now]).await;
    let server = server_for(&receiver, &[]);
    let org = server.org("acme");
    let agent = server.echo_agent(&org.api_key, "done").await;
    let request = json!({"message": "go", "callback_url": receiver.url("/hook")});
    let session = interact(&server, &org.api_key, &agent, request).await;

    let requests = receiver.wait_for(4, WAIT).await;
    let gap = |i: usize| {
        requests[i + 1]
            .at
            .duration_since(requests[i].at)
            .expect("in order")
    };
    assert!(gap(0) >= Duration::from_millis(2900), "waited {:?}", gap(0));
    // The schedule (1 s, ±20 %) applies when Retry-After makes no sense.
    assert!(gap(1) < Duration::from_millis(2500), "waited {:?}", gap(1));
    // `Retry-After: 0` does not shorten the schedule's wait.
    assert!(gap(2) >= Duration::from_millis(750), "waited {:?}", gap(2));
    server
        .wait_session(&org.api_key, &session, WAIT, |s| {
            s["callback"]["status"] == "succeeded"
        })
        .await;
}

#[tokio::test]
async fn a_410_ends_delivery_at_once() {
    let receiver = Receiver::start(vec![Reply::Status(410)]).await;
    let server = server_for(&receiver, &[]);
    let org = server.org("acme");
    let agent = server.echo_agent(&org.api_key, "done").await;
    let request = json!({"message": "go", "callback_url": receiver.url("/hook")});
    let session = interact(&server, &org.api_key, &agent, request).await;
    let state = server
        .wait_session(&org.api_key, &session, WAIT, |s| {
            s["callback"]["status"] == "failed"
        })
        .await;
    assert_eq!(state["callback"]["attempts"], json!(1));
    assert_eq!(state["callback"]["last_status_code"], json!(410));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(receiver.requests().len(), 1, "never retried");
}

#[tokio::test]
async fn a_receiver_that_trickles_its_body_is_cut_off_at_the_budget() {
    let receiver = Receiver::start(vec![Reply::Trickle(200)]).await;
    let server = server_for(&receiver, &["--callback-timeout", "2s"]);
    let org = server.org("acme");
    let agent = server.echo_agent(&org.api_key, "done").await;
    let request = json!({"message": "go", "callback_url": receiver.url("/hook")});
    let session = interact(&server, &org.api_key, &agent, request).await;

    server
        .wait_session(&org.api_key, &session, WAIT, |s| {
            s["callback"]["status"] == "succeeded"
        })
        .await;
    let attempts = attempts_of(&server, &org.api_key, &session).await;
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(attempts[0]["error_kind"], "timeout", "{attempts:?}");
    let took = attempts[0]["duration_ms"].as_i64().expect("duration");
    assert!(
        (1900..3000).contains(&took),
        "the first attempt took {took} ms"
    );
    assert_eq!(attempts[1]["status_code"], 200);
}

#[tokio::test]
async fn a_receiver_that_streams_without_end_is_read_only_to_the_limit() {
    let receiver = Receiver::start(vec![Reply::Endless(200), Reply::Endless(200)]).await;
    let server = server_for(&receiver, &[]);
    let org = server.org("acme");
    let agent = server.echo_agent(&org.api_key, "done").await;
    let before = server.rss_kib();
    let request = json!({"message": "go", "callback_url": receiver.url("/hook")});
    let mut sessions = Vec::new();
    for _ in 0..2 {
        sessions.push(interact(&server, &org.api_key, &agent, request.clone()).await);
    }
    for session in &sessions {
        server
            .wait_session(&org.api_key, session, WAIT, |s| {
                s["callback"]["status"] == "succeeded"
            })
            .await;
        let attempts = attempts_of(&server, &org.api_key, session).await;
        assert_eq!(attempts.len(), 1, "{attempts:?}");
        let took = attempts[0]["duration_ms"].as_i64().expect("duration");
        assert!(
            took < 5000,
            "stopped reading early, not at the budget: {took} ms"
        );
    }
    let grown = server.rss_kib().saturating_sub(before);
    assert!(grown < 20 * 1024, "memory grew by {grown} KiB");
}

#[tokio::test]
async fn a_self_signed_receiver_is_trusted_through_the_ca_file() {
    let receiver = Receiver::start_self_signed(vec![]).await;
    let server = server_for(&receiver, &[]);
    let org = server.org("acme");
    let agent = server.echo_agent(&org.api_key, "done").await;

    for url in [receiver.url("/by-name"), receiver.ip_url("/by-ip")] {
        let request = json!({"message": "go", "callback_url": url});
        interact(&server, &org.api_key, &agent, request).await;
    }
    let requests = receiver.wait_for(2, WAIT).await;
    for request in &requests {
        assert_signed(request, &org.signing_secret);
    }
}

#[tokio::test]
async fn an_operator_sees_every_attempt_and_redelivers_a_failed_callback() {
    let receiver = Receiver::start(vec![Reply::Status(400)]).await;
    let server = server_for(&receiver, &[]);
    let org = server.org("acme");
    let agent = server.echo_agent(&org.api_key, "done").await;
    let request = json!({"message": "go", "callback_url": receiver.url("/hook")});
    let session = interact(&server, &org.api_key, &agent, request).await;
    server
        .wait_session(&org.api_key, &session, WAIT, |s| {
            s["callback"]["status"] == "failed"
        })
        .await;

    let (status, failed) = server
        .get("/v1/callbacks?status=failed", &org.api_key)
        .await;
    assert_eq!(status, 200, "{failed}");
    let listed = failed["callbacks"].as_array().expect("callbacks");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["session_id"], json!(session));
    let id = listed[0]["callback_event_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let (_, pending) = server
        .get("/v1/callbacks?status=pending", &org.api_key)
        .await;
    assert_eq!(pending["callbacks"], json!([]));
    let (status, _) = server.get("/v1/callbacks?status=lost", &org.api_key).await;
    assert_eq!(status, 400);

    // Another organisation can neither see nor redeliver it.
    let other = server.org("other");
    let (_, theirs) = server.get("/v1/callbacks", &other.api_key).await;
    assert_eq!(theirs["callbacks"], json!([]));
    let redeliver = format!("/v1/callbacks/{id}/redeliver");
    assert_eq!(
        server.post(&redeliver, &other.api_key, json!({})).await.0,
        404
    );

    let (status, queued) = server.post(&redeliver, &org.api_key, json!({})).await;
    assert_eq!(status, 202, "{queued}");
    assert_eq!(queued["status"], json!("pending"));
    let requests = receiver.wait_for(2, WAIT).await;
    assert_eq!(requests[1].body, requests[0].body, "the same id and bytes");
    assert_signed(&requests[1], &org.signing_secret);

    let path = format!("/v1/agent-sessions/{session}/callback");
    let log = tokio::time::timeout(WAIT, async {
        loop {
            let (_, callback) = server.get(&path, &org.api_key).await;
            if callback["status"] == "succeeded" {
                return callback;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the redelivery succeeds");
    let attempts = log["attempt_log"].as_array().expect("attempt_log");
    let codes: Vec<&Value> = attempts.iter().map(|a| &a["status_code"]).collect();
    assert_eq!(codes, [&json!(400), &json!(200)]);
    assert_eq!(attempts[1]["n"], json!(2));
    assert!(attempts[0]["duration_ms"].is_u64());
}

#[tokio::test]
async fn the_cli_lists_shows_and_redelivers_failed_callbacks() {
    let receiver = Receiver::start(vec![Reply::Status(422)]).await;
    let server = server_for(&receiver, &[]);
    let org = server.org("acme");
    let agent = server.echo_agent(&org.api_key, "done").await;
    let request = json!({"message": "go", "callback_url": receiver.url("/hook")});
    let session = interact(&server, &org.api_key, &agent, request).await;
    server
        .wait_session(&org.api_key, &session, WAIT, |s| {
            s["callback"]["status"] == "failed"
        })
        .await;

    let cli = |args: &[&str]| {
        let output = std::process::Command::new(support::server::binary())
            .args(args)
            .args(["--database-url", &server.database_url()])
            .output()
            .expect("run outrider");
        assert!(output.status.success(), "{args:?}: {output:?}");
        String::from_utf8(output.stdout).expect("utf-8")
    };
    let listed = cli(&["callbacks", "list", "--status", "failed"]);
    let line: Value = serde_json::from_str(listed.trim()).expect("one JSON line");
    assert_eq!(line["session_id"], json!(session));
    let id = line["callback_event_id"].as_str().expect("id").to_owned();

    let shown: Value = serde_json::from_str(&cli(&["callbacks", "show", &id])).expect("JSON");
    assert_eq!(shown["attempt_log"][0]["status_code"], json!(422));

    cli(&["callbacks", "redeliver", &id]);
    let requests = receiver.wait_for(2, WAIT).await;
    assert_eq!(requests[1].body, requests[0].body);
    assert_signed(&requests[1], &org.signing_secret);
}

#[tokio::test]
async fn a_hanging_receiver_does_not_delay_callbacks_to_others() {
    let hang = || Reply::Delay(Duration::from_secs(8), 200);
    let hanging = Receiver::start((0..6).map(|_| hang()).collect()).await;
    let healthy = Receiver::start(vec![]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let both = dir.path().join("both.pem");
    let pems = [hanging.ca_file(), healthy.ca_file()].map(|f| std::fs::read(f).expect("CA"));
    std::fs::write(&both, pems.concat()).expect("write the CA bundle");
    let server = Server::start(&[
        "--callback-allow",
        "127.0.0.0/8",
        "--callback-ca-file",
        both.to_str().expect("utf-8 path"),
        "--delivery-concurrency",
        "4",
        "--delivery-per-destination",
        "2",
    ]);
    let org = server.org("acme");
    let agent = server.echo_agent(&org.api_key, "done").await;

    let mut slow = Vec::new();
    for _ in 0..6 {
        let request = json!({"message": "go", "callback_url": hanging.url("/slow")});
        slow.push(interact(&server, &org.api_key, &agent, request).await);
    }
    hanging.wait_for(2, WAIT).await;
    let started = std::time::Instant::now();
    let mut fast = Vec::new();
    for _ in 0..3 {
        let request = json!({"message": "go", "callback_url": healthy.ip_url("/fast")});
        fast.push(interact(&server, &org.api_key, &agent, request).await);
    }

    let arrived = healthy.wait_for(3, WAIT).await;
    assert_eq!(arrived.len(), 3);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        hanging.requests().len(),
        2,
        "at most two attempts in flight to one host"
    );

    // Operators see which callbacks are claimed for an attempt, and until
    // when; a delivered one is claimed no more.
    let mut claimed = 0;
    for session in &slow {
        claimed += usize::from(
            claimed_until(&server, &org.api_key, session)
                .await
                .is_some(),
        );
    }
    assert!((2..=4).contains(&claimed), "{claimed} claimed");
    for session in &fast {
        server
            .wait_session(&org.api_key, session, WAIT, |s| {
                s["callback"]["status"] == "succeeded"
            })
            .await;
        assert_eq!(claimed_until(&server, &org.api_key, session).await, None);
    }
}

/// When the session's callback stops being claimed for an attempt, if it is.
async fn claimed_until(server: &Server, key: &str, session: &str) -> Option<String> {
    let path = format!("/v1/agent-sessions/{session}/callback");
    let (status, body) = server.get(&path, key).await;
    assert_eq!(status, 200, "{body}");
    body["claimed_until"].as_str().map(str::to_owned)
}

#[tokio::test]
async fn cancelling_a_running_session_stops_it_at_once_and_reports_cancelled() {
    let receiver = Receiver::start(vec![]).await;
    let slow = ModelReply::Delayed(
        Duration::from_secs(10),
        Box::new(ModelReply::Text("late".into())),
    );
    let model = FakeModel::start(vec![slow]).await;
    let server = server_for(&receiver, &["--openai-base-url", &model.base_url()]);
    let org = server.org("acme");
    let agent = server
        .agent(&org.api_key, json!({"name": "slow", "model": "m"}))
        .await;
    let request = json!({"message": "go", "callback_url": receiver.url("/hook")});
    let session = interact(&server, &org.api_key, &agent, request).await;
    tokio::time::timeout(WAIT, async {
        while model.calls().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the model was called");

    let started = std::time::Instant::now();
    let path = format!("/v1/agent-sessions/{session}/cancel");
    let (status, body) = server.post(&path, &org.api_key, json!({})).await;
    assert_eq!(status, 202, "{body}");
    let requests = receiver.wait_for(1, WAIT).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(body_of(&requests[0])["status"], json!("cancelled"));
    let (_, state) = server
        .get(&format!("/v1/agent-sessions/{session}"), &org.api_key)
        .await;
    assert_eq!(state["status"], json!("cancelled"));
}

/// The `sig=` values of a request's signature header, with `t`.
fn signatures(request: &Recorded) -> (String, Vec<String>) {
    let header = request
        .header("x-scout-signature")
        .expect("signature header");
    let mut t = String::new();
    let mut sigs = Vec::new();
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => t = value.to_owned(),
            Some(("sig", value)) => sigs.push(value.to_owned()),
            _ => panic!("unexpected part {part:?} in {header}"),
        }
    }
    (t, sigs)
}

#[tokio::test]
async fn a_rotated_secret_signs_beside_the_old_one_until_the_grace_period_ends() {
    let receiver = Receiver::start(vec![]).await;
    let server = server_for(&receiver, &[]);
    let org = server.org("acme");
    let agent = server.echo_agent(&org.api_key, "done").await;

    let (status, rotated) = server
        .post("/v1/signing-secrets/rotate", &org.api_key, json!({}))
        .await;
    assert_eq!(status, 201, "{rotated}");
    let new_secret = rotated["signing_secret"]
        .as_str()
        .expect("secret")
        .to_owned();
    assert_ne!(new_secret, org.signing_secret);

    let request = json!({"message": "go", "callback_url": receiver.url("/hook")});
    interact(&server, &org.api_key, &agent, request.clone()).await;
    let first = receiver.wait_for(1, WAIT).await.remove(0);
    let (t, sigs) = signatures(&first);
    let expected = [&org.signing_secret, &new_secret].map(|s| hmac_b64(s, &t, &first.body));
    assert_eq!(sigs, expected, "one sig= per active secret, oldest first");

    // With no grace period, only the newest secret signs.
    let path = "/v1/signing-secrets/rotate?grace_seconds=0";
    let (status, latest) = server.post(path, &org.api_key, json!({})).await;
    assert_eq!(status, 201, "{latest}");
    let latest = latest["signing_secret"]
        .as_str()
        .expect("secret")
        .to_owned();
    interact(&server, &org.api_key, &agent, request).await;
    let second = receiver.wait_for(2, WAIT).await.remove(1);
    let (t, sigs) = signatures(&second);
    assert_eq!(sigs, [hmac_b64(&latest, &t, &second.body)]);

    let (status, _) = server
        .post(
            "/v1/signing-secrets/rotate?grace_seconds=-1",
            &org.api_key,
            json!({}),
        )
        .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn the_cli_rotates_a_secret() {
    let server = Server::start(&[]);
    let org = server.org("acme");
    let run = |org_id: &str| {
        std::process::Command::new(support::server::binary())
            .args(["org", "rotate-secret", org_id, "--json", "--grace", "1h"])
            .args(["--database-url", &server.database_url()])
            .output()
            .expect("run outrider")
    };
    let output = run(&org.org_id);
    assert!(output.status.success(), "{output:?}");
    let printed: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert!(printed["signing_secret"]
        .as_str()
        .expect("secret")
        .starts_with("whsec_"));
    assert!(!run("no-such-org").status.success());
}

#[tokio::test]
async fn a_failing_receivers_circuit_opens_and_its_callbacks_wait_for_a_probe() {
    let receiver = Receiver::start(vec![Reply::Status(503), Reply::Status(503)]).await;
    let server = server_for(
        &receiver,
        &[
            "--circuit-failures",
            "2",
            "--circuit-cooldown",
            "3s",
            "--delivery-per-destination",
            "1",
        ],
    );
    let org = server.org("acme");
    let agent = server.echo_agent(&org.api_key, "done").await;
    let request = json!({"message": "go", "callback_url": receiver.url("/hook")});
    let mut sessions = Vec::new();
    for _ in 0..4 {
        sessions.push(interact(&server, &org.api_key, &agent, request.clone()).await);
    }

    // Two failures open the circuit: the other callbacks are deferred to
    // its end without an attempt, though they were due at once.
    receiver.wait_for(2, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.requests().len(), 2, "nothing is sent while open");
    let mut deferred = 0;
    for session in &sessions {
        let (_, state) = server
            .get(&format!("/v1/agent-sessions/{session}"), &org.api_key)
            .await;
        if state["callback"]["status"] == "pending" {
            deferred += 1;
        }
    }
    assert_eq!(deferred, 4, "all wait, none dropped");

    for session in &sessions {
        server
            .wait_session(&org.api_key, session, WAIT, |s| {
                s["callback"]["status"] == "succeeded"
            })
            .await;
    }
    let requests = receiver.requests();
    assert_eq!(
        requests.len(),
        6,
        "2 failures, then 1 probe and the other 3"
    );
    let gap = requests[2]
        .at
        .duration_since(requests[1].at)
        .expect("in order");
    assert!(
        gap >= Duration::from_millis(2500),
        "the probe waited {gap:?}"
    );
}

/// The signing secrets of `orgs` as stored in the server's SQLite file.
async fn stored_secrets(server: &Server, orgs: &[&str]) -> Vec<String> {
    let options = server
        .database_url()
        .parse::<sqlx::sqlite::SqliteConnectOptions>()
        .expect("database URL")
        .read_only(true);
    let pool = sqlx::SqlitePool::connect_with(options).await.expect("open");
    let orgs = serde_json::to_string(orgs).expect("org ids as JSON");
    let sql = "SELECT secret FROM signing_secrets WHERE org_id IN (SELECT value FROM json_each(?))";
    let secrets = sqlx::query_scalar(sql)
        .bind(orgs)
        .fetch_all(&pool)
        .await
        .expect("read secrets");
    pool.close().await;
    secrets
}

#[tokio::test]
async fn signing_secrets_are_sealed_at_rest_under_the_operator_key() {
    const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    let receiver = Receiver::start(vec![]).await;
    let ca = receiver.ca_file().to_str().expect("utf-8 path").to_owned();
    let args = ["--callback-allow", "127.0.0.0/8", "--callback-ca-file", &ca];

    // A secret created without a key is stored as it is ...
    let mut server = Server::start(&args);
    let org = server.org("acme");
    assert_eq!(
        stored_secrets(&server, &[&org.org_id]).await,
        vec![org.signing_secret.clone()]
    );

    // ... and sealed when the server starts with one.
    server.env = vec![("OUTRIDER_ENCRYPTION_KEY".into(), KEY.into())];
    server.restart();
    let later = server.org("later");
    let (status, rotated) = server
        .post("/v1/signing-secrets/rotate", &org.api_key, json!({}))
        .await;
    assert_eq!(status, 201, "{rotated}");
    let rotated = rotated["signing_secret"].as_str().expect("secret");
    let stored = stored_secrets(&server, &[&org.org_id, &later.org_id]).await;
    assert_eq!(stored.len(), 3);
    for secret in [org.signing_secret.as_str(), &later.signing_secret, rotated] {
        assert!(
            stored.iter().all(|s| !s.contains(secret)),
            "{secret} is not stored in the clear: {stored:?}"
        );
    }
    assert!(
        stored.iter().all(|s| s.starts_with("sealed:v1:")),
        "{stored:?}"
    );

    // Callbacks are still signed with the secrets the organisations hold.
    let agent = server.echo_agent(&later.api_key, "done").await;
    let request = json!({"message": "go", "callback_url": receiver.url("/hook")});
    interact(&server, &later.api_key, &agent, request).await;
    let callback = receiver.wait_for(1, WAIT).await.remove(0);
    assert_signed(&callback, &later.signing_secret);

    // Without the key, or with another, the server refuses to start.
    server.kill();
    let other = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
    for key in [None, Some(other.as_str())] {
        let mut command = std::process::Command::new(support::server::binary());
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--database-url"])
            .arg(server.database_url())
            .env_remove("OUTRIDER_ENCRYPTION_KEY");
        if let Some(key) = key {
            command.env("OUTRIDER_ENCRYPTION_KEY", key);
        }
        let output = command.output().expect("run outrider serve");
        assert!(!output.status.success(), "{key:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("OUTRIDER_ENCRYPTION_KEY"), "{stderr}");
    }
}

/// Verifies the Standard Webhooks headers with the `standardwebhooks`
/// crate, an implementation independent of the server's.
fn verify_standard(request: &Recorded, secret: &str) -> Result<(), String> {
    let mut headers = reqwest::header::HeaderMap::new();
    for (name, value) in &request.headers {
        let name = reqwest::header::HeaderName::from_bytes(name.as_bytes()).expect("header name");
        headers.append(name, value.parse().expect("header value"));
    }
    let webhook = standardwebhooks::Webhook::new(secret).map_err(|e| e.to_string())?;
    webhook
        .verify(&request.body, &headers)
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn an_organisation_may_also_have_standard_webhooks_headers_sent() {
    let receiver = Receiver::start(vec![]).await;
    let server = server_for(&receiver, &[]);
    let org = server.org("acme");
    let agent = server.echo_agent(&org.api_key, "done").await;
    let request = json!({"message": "go", "callback_url": receiver.url("/hook")});

    // Off by default: only the Scout headers.
    let (status, settings) = server.get("/v1/organization", &org.api_key).await;
    assert_eq!(status, 200, "{settings}");
    assert_eq!(settings["standard_webhooks"], false);
    assert_eq!(settings["id"], json!(org.org_id));
    interact(&server, &org.api_key, &agent, request.clone()).await;
    let plain = receiver.wait_for(1, WAIT).await.remove(0);
    assert_signed(&plain, &org.signing_secret);
    assert_eq!(plain.header("webhook-signature"), None);

    let patch = json!({"standard_webhooks": true});
    let (status, settings) = server
        .call(
            reqwest::Method::PATCH,
            "/v1/organization",
            Some(&org.api_key),
            Some(patch),
        )
        .await;
    assert_eq!(status, 200, "{settings}");
    assert_eq!(settings["standard_webhooks"], true);

    let session = interact(&server, &org.api_key, &agent, request.clone()).await;
    let signed = receiver.wait_for(2, WAIT).await.remove(1);
    assert_signed(&signed, &org.signing_secret);
    verify_standard(&signed, &org.signing_secret).expect("verifies as Standard Webhooks");
    assert_eq!(
        signed.header("webhook-id"),
        body_of(&signed)["callback_event_id"].as_str()
    );
    assert_eq!(body_of(&signed)["session_id"], json!(session));
    let other = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    assert!(
        verify_standard(&signed, other).is_err(),
        "another secret fails"
    );

    // During a rotation both secrets sign, and either verifies.
    let (status, rotated) = server
        .post("/v1/signing-secrets/rotate", &org.api_key, json!({}))
        .await;
    assert_eq!(status, 201, "{rotated}");
    let new_secret = rotated["signing_secret"].as_str().expect("secret");
    interact(&server, &org.api_key, &agent, request).await;
    let rotating = receiver.wait_for(3, WAIT).await.remove(2);
    let values = rotating.header("webhook-signature").expect("signature");
    assert_eq!(values.split(' ').count(), 2, "{values}");
    verify_standard(&rotating, &org.signing_secret).expect("the old secret verifies");
    verify_standard(&rotating, new_secret).expect("the new secret verifies");
}

#[tokio::test]
async fn organisation_settings_refuse_bad_input() {
    let server = Server::start(&[]);
    let org = server.org("acme");
    for (body, field) in [
        (json!({"standard_webhooks": "yes"}), "standard_webhooks"),
        (json!({"standard_webhook": true}), "standard_webhook"),
    ] {
        let (status, answer) = server
            .call(
                reqwest::Method::PATCH,
                "/v1/organization",
                Some(&org.api_key),
                Some(body),
            )
            .await;
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["error"]["field"], field, "{answer}");
    }
    let (status, _) = server.get("/v1/organization", "ork_wrong").await;
    assert_eq!(status, 401);
    let (_, settings) = server.get("/v1/organization", &org.api_key).await;
    assert_eq!(settings["standard_webhooks"], false, "nothing changed");
}

#[tokio::test]
async fn the_cli_turns_standard_webhooks_on_and_off() {
    let server = Server::start(&[]);
    let org = server.org("acme");
    let run = |args: &[&str]| {
        std::process::Command::new(support::server::binary())
            .args(["org", "set"])
            .args(args)
            .args(["--database-url", &server.database_url()])
            .output()
            .expect("run outrider")
    };
    let on = run(&[&org.org_id, "--standard-webhooks", "on"]);
    assert!(on.status.success(), "{on:?}");
    let printed: Value = serde_json::from_slice(&on.stdout).expect("JSON");
    assert_eq!(printed["standard_webhooks"], true);
    let (_, settings) = server.get("/v1/organization", &org.api_key).await;
    assert_eq!(settings["standard_webhooks"], true);

    let off = run(&[&org.org_id, "--standard-webhooks", "off"]);
    let printed: Value = serde_json::from_slice(&off.stdout).expect("JSON");
    assert_eq!(printed["standard_webhooks"], false);
    assert!(!run(&[&org.org_id, "--standard-webhooks", "maybe"])
        .status
        .success());
    assert!(!run(&["no-such-org", "--standard-webhooks", "on"])
        .status
        .success());
}

/// Starts `outrider listen` on port 0 and returns it with the URL it prints.
fn start_listen(
    dir: &std::path::Path,
    secret: Option<&str>,
) -> (
    std::process::Child,
    std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    String,
) {
    use std::io::{BufRead, BufReader};
    let mut command = std::process::Command::new(support::server::binary());
    command
        .args(["listen", "--listen", "127.0.0.1:0", "--dir"])
        .arg(dir);
    if let Some(secret) = secret {
        command.args(["--secret", secret]);
    }
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn outrider listen");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a first line").expect("utf-8");
    let url = first
        .split_whitespace()
        .find(|word| word.starts_with("https://"))
        .expect("the URL")
        .to_owned();
    (child, lines, url)
}

#[tokio::test]
async fn outrider_listen_receives_and_verifies_callbacks() {
    let dir = tempfile::tempdir().expect("temp dir");
    // The first start makes the CA the server must trust; the second reuses it.
    let (mut first, _, _) = start_listen(dir.path(), None);
    let _ = first.kill();
    let _ = first.wait();
    let ca = dir.path().join("ca.pem");
    let server = Server::start(&[
        "--callback-allow",
        "127.0.0.0/8,::1",
        "--callback-ca-file",
        ca.to_str().expect("utf-8 path"),
    ]);
    let org = server.org("acme");
    let (mut listen, mut lines, url) = start_listen(dir.path(), Some(&org.signing_secret));

    let agent = server.echo_agent(&org.api_key, "from listen").await;
    let request = json!({"message": "go", "callback_url": format!("{url}hook")});
    let session = interact(&server, &org.api_key, &agent, request).await;

    let printed = tokio::task::spawn_blocking(move || {
        let mut seen = String::new();
        for line in lines.by_ref() {
            let line = line.expect("utf-8");
            seen.push_str(&line);
            seen.push('\n');
            if line.contains("from listen") {
                break;
            }
        }
        seen
    });
    let printed = tokio::time::timeout(WAIT, printed)
        .await
        .expect("printed")
        .expect("joined");
    assert!(printed.contains("signature ok"), "{printed}");
    assert!(printed.contains(&session), "{printed}");
    server
        .wait_session(&org.api_key, &session, WAIT, |s| {
            s["callback"]["status"] == "succeeded"
        })
        .await;
    let _ = listen.kill();
}
