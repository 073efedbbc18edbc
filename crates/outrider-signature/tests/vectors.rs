//! The shared test vectors, checked against this crate and against the
//! receiver snippets in `docs/receivers/` (Python, Node.js and Go).

use base64::Engine;
use outrider_signature::{verify, VerifyError};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn vectors_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors.json")
}

fn vectors() -> Vec<Value> {
    let text = std::fs::read_to_string(vectors_path()).expect("vectors.json");
    let file: Value = serde_json::from_str(&text).expect("vectors are JSON");
    file["vectors"].as_array().expect("a vectors list").clone()
}

fn kind(error: &VerifyError) -> &'static str {
    match error {
        VerifyError::Malformed(_) => "malformed",
        VerifyError::Expired { .. } => "expired",
        VerifyError::Mismatch => "mismatch",
    }
}

#[test]
fn the_crate_agrees_with_every_vector() {
    let vectors = vectors();
    assert!(vectors.len() >= 15);
    for vector in vectors {
        let name = vector["name"].as_str().expect("name");
        let body = base64::engine::general_purpose::STANDARD
            .decode(vector["body_base64"].as_str().expect("body"))
            .expect("base64 body");
        let got = verify(
            vector["secret"].as_str().expect("secret"),
            vector["header"].as_str().expect("header"),
            &body,
            vector["now"].as_u64().expect("now"),
        );
        let got = got.as_ref().err().map(kind);
        let want = vector["error"].as_str();
        assert_eq!(got, want, "{name}");
        assert_eq!(
            got.is_none(),
            vector["valid"].as_bool().expect("valid"),
            "{name}"
        );
    }
}

/// Runs a receiver snippet's own check over the vectors: `command` (a program
/// and its leading arguments), then the snippet's path, then the vectors' path.
fn run_snippet(command: &[&str], script: &str) {
    let (program, args) = command.split_first().expect("a program");
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/receivers");
    let mut snippet = Command::new(program);
    snippet
        .args(args)
        .arg(docs.join(script))
        .arg(vectors_path());
    // `go` needs a build cache, which it puts under $HOME unless told otherwise.
    if *program == "go"
        && std::env::var_os("GOCACHE").is_none()
        && std::env::var_os("HOME").is_none()
    {
        snippet.env("GOCACHE", std::env::temp_dir().join("outrider-go-cache"));
    }
    let output = snippet
        .output()
        .unwrap_or_else(|e| panic!("{program} is needed for this test: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{script}:\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}

#[test]
fn the_python_receiver_snippet_agrees_with_every_vector() {
    run_snippet(&["python3"], "verify.py");
}

#[test]
fn the_node_receiver_snippet_agrees_with_every_vector() {
    run_snippet(&["node"], "verify.mjs");
}

#[test]
fn the_go_receiver_snippet_agrees_with_every_vector() {
    run_snippet(&["go", "run"], "verify.go");
}
