//! The embedded local model measured through a real `outrider serve`: load
//! time, time to first token for a prompt of about 50 tokens, generation
//! speed, resident memory with the model loaded, and eight sessions at once
//! against one at a time.
//!
//! The server starts on a fresh database (its first start makes the
//! organisation), fetches the default model if the models directory lacks
//! it, and each session is a synchronous `interact` call whose `llm_call`
//! event reports the model's own timings.
//!
//! ```text
//! cargo build --release -p outrider --bins --examples
//! ./target/release/examples/model_bench --models-dir /var/tmp/outrider-models
//! ```

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// The `outrider` binary; default: `../outrider` from this program's directory.
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Where the model is (or is fetched to).
    #[arg(long, env = "OUTRIDER_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    /// Tokens each reply may generate.
    #[arg(long, default_value_t = 128)]
    tokens: u32,
    /// Sessions run one after another, then this many at once.
    #[arg(long, default_value_t = 8)]
    sessions: usize,
}

/// A topic per session, so no two prompts are the same.
const TOPICS: &[&str] = &[
    "a lighthouse keeper who finds a message in a bottle",
    "a baker who opens a shop on the moon",
    "a cat that learns to play the violin",
    "an old clockmaker and his stubborn apprentice",
    "two rival gardeners in a small village",
    "a librarian who discovers a book that writes itself",
    "a fisherman caught in a winter storm",
    "a child who builds a robot from scrap metal",
    "a painter who can only paint the sea",
    "a mail carrier on a remote island",
];

struct Server {
    child: Child,
    base: String,
    log: PathBuf,
    http: reqwest::Client,
    key: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one session reported.
struct Run {
    wall: Duration,
    prompt_tokens: u64,
    completion_tokens: u64,
    time_to_first_token_ms: u64,
    tokens_per_second: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let binary = match &args.binary {
        Some(binary) => binary.clone(),
        None => std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .context("locating the target directory")?
            .join("outrider"),
    };
    let dir = tempfile::tempdir()?;
    let server = start(&binary, dir.path(), args.models_dir.as_deref())?;
    println!("idle server: {} MB resident", rss_mb(&server.child));

    let agent = json!({"name": "bench", "max_tokens": args.tokens, "temperature": 0.7});
    let agent = post(&server, "/v1/agents", agent).await?;
    let agent = agent["id"].as_str().context("agent id")?.to_owned();

    // The first session loads the model (fetching it first if need be).
    let warm = session(&server, &agent, "Say hello.").await?;
    let load_ms = log_field(&server.log, "load_ms").context("no load_ms in the log")?;
    println!(
        "model load: {load_ms} ms (first session {:?} in all)",
        warm.wall
    );
    println!(
        "with the model loaded: {} MB resident",
        rss_mb(&server.child)
    );

    let topics = TOPICS.iter().cycle().take(args.sessions);
    let prompts: Vec<String> = topics
        .enumerate()
        .map(|(i, topic)| format!("Write a short story of several paragraphs about {topic}. ({i})"))
        .collect();

    let mut one_by_one = Vec::new();
    for prompt in &prompts {
        one_by_one.push(session(&server, &agent, prompt).await?);
    }
    report(
        "one at a time",
        &one_by_one,
        one_by_one.iter().map(|r| r.wall).sum(),
    );

    let started = Instant::now();
    let at_once = prompts.iter().map(|p| session(&server, &agent, p));
    let at_once: Vec<Run> = futures_util::future::try_join_all(at_once).await?;
    report(
        &format!("{} at once", prompts.len()),
        &at_once,
        started.elapsed(),
    );

    let peak = status_kib(&server.child, "VmHWM:") / 1024;
    println!("peak resident memory: {peak} MB");
    Ok(())
}

fn report(label: &str, runs: &[Run], wall: Duration) {
    let tokens: u64 = runs.iter().map(|r| r.completion_tokens).sum();
    let mut ttft: Vec<u64> = runs.iter().map(|r| r.time_to_first_token_ms).collect();
    ttft.sort_unstable();
    let prompt: Vec<u64> = runs.iter().map(|r| r.prompt_tokens).collect();
    let speed: Vec<String> = runs
        .iter()
        .map(|r| format!("{:.1}", r.tokens_per_second))
        .collect();
    println!(
        "{label}: {} sessions, {tokens} tokens in {:.2} s = {:.1} tokens/s in all",
        runs.len(),
        wall.as_secs_f64(),
        tokens as f64 / wall.as_secs_f64()
    );
    println!("  prompt tokens: {prompt:?}");
    println!(
        "  time to first token: median {} ms, max {} ms",
        ttft[ttft.len() / 2],
        ttft[ttft.len() - 1]
    );
    println!("  tokens/s per session: {}", speed.join(" "));
}

fn start(binary: &Path, dir: &Path, models: Option<&Path>) -> anyhow::Result<Server> {
    let log = dir.join("server.log");
    let mut command = Command::new(binary);
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--database-url"])
        .arg(format!("sqlite://{}", dir.join("bench.db").display()))
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?);
    if let Some(models) = models {
        command.arg("--models-dir").arg(models);
    }
    let mut child = command.spawn().context("starting outrider serve")?;

    // The first start prints the address, then the new API key.
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut base = None;
    let mut key = None;
    for line in lines.by_ref() {
        let line = line?;
        if let Some(address) = line.strip_prefix("outrider listening on ") {
            base = Some(address.to_owned());
        }
        if let Some(value) = line.trim().strip_prefix("api key:") {
            key = Some(value.trim().to_owned());
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    let (Some(base), Some(key)) = (base, key) else {
        bail!(
            "the server printed no address and key; see {}",
            log.display()
        );
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .use_preconfigured_tls(outrider::delivery::client::tls_config(None)?)
        .build()?;
    Ok(Server {
        child,
        base,
        log,
        http,
        key,
    })
}

async fn post(server: &Server, path: &str, body: Value) -> anyhow::Result<Value> {
    let response = server
        .http
        .post(format!("{}{path}", server.base))
        .bearer_auth(&server.key)
        .json(&body)
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await?;
    if !status.is_success() {
        bail!("{path} answered {status}: {body}");
    }
    Ok(body)
}

/// Runs one synchronous session and reads its `llm_call` usage.
async fn session(server: &Server, agent: &str, message: &str) -> anyhow::Result<Run> {
    let started = Instant::now();
    let path = format!("/v1/agents/{agent}/interact");
    let answer = post(server, &path, json!({"message": message})).await?;
    let wall = started.elapsed();
    if answer["status"] != "succeeded" {
        bail!("the session did not succeed: {answer}");
    }
    let session = answer["session_id"].as_str().context("session_id")?;
    let url = format!("{}/v1/agent-sessions/{session}/events", server.base);
    let events: Value = server
        .http
        .get(url)
        .bearer_auth(&server.key)
        .send()
        .await?
        .json()
        .await?;
    let events = events["events"].as_array().context("events")?;
    let call = events
        .iter()
        .find(|e| e["type"] == "llm_call")
        .context("no llm_call event")?;
    let usage = &call["data"]["usage"];
    let number = |name: &str| usage[name].as_u64().unwrap_or_default();
    Ok(Run {
        wall,
        prompt_tokens: number("prompt_tokens"),
        completion_tokens: number("completion_tokens"),
        time_to_first_token_ms: number("time_to_first_token_ms"),
        tokens_per_second: usage["tokens_per_second"].as_f64().unwrap_or_default(),
    })
}

/// The last `name=value` the server logged.
fn log_field(log: &Path, name: &str) -> Option<u64> {
    let text = std::fs::read_to_string(log).ok()?;
    let prefix = format!("{name}=");
    text.split_whitespace()
        .rev()
        .filter_map(|word| word.strip_prefix(&prefix))
        .find_map(|value| value.parse().ok())
}

fn rss_mb(child: &Child) -> u64 {
    status_kib(child, "VmRSS:") / 1024
}

fn status_kib(child: &Child, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()));
    status
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_default()
}
