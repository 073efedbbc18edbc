//! Load on the accept path: `POST /v1/agents/{id}/interact` with a callback.
//!
//! With `--rate 0` it sends as fast as `--concurrency` connections allow and
//! reports throughput; with a rate it sends on a fixed schedule and measures
//! each latency from the moment the request was due, so a stalled server
//! cannot hide its delays.
//!
//! ```text
//! cargo run --release --example accept_load -- \
//!     --url http://127.0.0.1:8080 --key ork_… --agent 0193… --rate 500 --seconds 10
//! ```

use clap::Parser;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    url: String,
    #[arg(long)]
    key: String,
    #[arg(long)]
    agent: String,
    /// Requests per second; 0 sends as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u32,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value = "https://example.com/outrider-hook")]
    callback_url: String,
}

struct Totals {
    latencies: Vec<Duration>,
    errors: u64,
}

#[tokio::main]
async fn main() {
    let args = Arc::new(Args::parse());
    let tls = outrider::delivery::client::tls_config(None).expect("TLS config");
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .pool_max_idle_per_host(args.concurrency)
        .build()
        .expect("client");
    let totals = Arc::new(Mutex::new(Totals {
        latencies: Vec::new(),
        errors: 0,
    }));

    let started = Instant::now();
    if args.rate == 0 {
        flood(&args, &client, &totals).await;
    } else {
        paced(&args, &client, &totals).await;
    }
    report(&totals.lock().expect("totals"), started.elapsed());
}

async fn send(args: &Args, client: &reqwest::Client) -> bool {
    let body = serde_json::json!({"message": "hello", "callback_url": args.callback_url});
    let url = format!("{}/v1/agents/{}/interact", args.url, args.agent);
    let response = client
        .post(url)
        .bearer_auth(&args.key)
        .json(&body)
        .send()
        .await;
    matches!(response, Ok(r) if r.status().as_u16() == 202)
}

fn record(totals: &Mutex<Totals>, ok: bool, latency: Duration) {
    let mut totals = totals.lock().expect("totals");
    if ok {
        totals.latencies.push(latency);
    } else {
        totals.errors += 1;
    }
}

async fn flood(args: &Arc<Args>, client: &reqwest::Client, totals: &Arc<Mutex<Totals>>) {
    let until = Instant::now() + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (args, client, totals) = (args.clone(), client.clone(), totals.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                let sent = Instant::now();
                let ok = send(&args, &client).await;
                record(&totals, ok, sent.elapsed());
            }
        }));
    }
    for task in tasks {
        task.await.expect("load task");
    }
}

async fn paced(args: &Arc<Args>, client: &reqwest::Client, totals: &Arc<Mutex<Totals>>) {
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let total = u64::from(args.rate) * args.seconds;
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for n in 0..total {
        let due = start + interval.mul_f64(n as f64);
        tokio::time::sleep_until(due).await;
        let (args, client, totals) = (args.clone(), client.clone(), totals.clone());
        tasks.push(tokio::spawn(async move {
            let ok = send(&args, &client).await;
            record(&totals, ok, due.elapsed());
        }));
    }
    for task in tasks {
        task.await.expect("load task");
    }
}

fn report(totals: &Totals, elapsed: Duration) {
    let mut latencies = totals.latencies.clone();
    latencies.sort();
    let at = |q: f64| {
        let i = ((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1));
        latencies.get(i).copied().unwrap_or_default()
    };
    let accepted = latencies.len() as f64;
    println!(
        "accepted {} in {:.1}s = {:.0}/s, errors {}",
        latencies.len(),
        elapsed.as_secs_f64(),
        accepted / elapsed.as_secs_f64(),
        totals.errors
    );
    println!(
        "latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        at(0.50).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        at(1.0).as_secs_f64() * 1e3
    );
}
