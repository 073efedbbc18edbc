//! Load on the callback path: the outbox dispatcher of a real `outrider serve`
//! against HTTPS receivers running in this process.
//!
//! Deliveries are written straight into the `deliveries` table of a fresh
//! database (after `outrider org create` made the schema and a signing
//! secret), then the release binary is started on it with `--workers 0`, so
//! the dispatcher is the only thing at work.
//!
//! - `burst`: 10,000 callbacks fall due at once to one receiver that answers
//!   `200` at once. Reports the time from due to the last arrival, callbacks
//!   per second and the due-to-arrival latencies.
//! - `isolation`: 500 callbacks to a receiver that accepts TLS and never
//!   answers, 500 to a healthy one, all due at once (the hanging receiver's
//!   rows first in claim order). Reports the healthy receiver's latencies.
//! - `backlog`: 200,000 deliveries waiting for a retry an hour away, against
//!   an empty outbox. Reports resident memory and CPU time of the idle
//!   server, and the cost of the dispatcher's two poll queries.
//!
//! ```text
//! cargo build --release -p outrider --bins --examples
//! ./target/release/examples/callback_load burst
//! ./target/release/examples/callback_load burst -- --delivery-per-destination 64
//! ```
//!
//! Flags after `--` are passed to `outrider serve`. The binary is looked for
//! beside this example's directory (`target/release/outrider`) unless
//! `--binary` names it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use axum::body::Body;
use clap::{Parser, ValueEnum};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use outrider::domain::{new_id, now_ms};
use outrider::listen::{server_tls, LoopbackCertificates};
use outrider::store::{CLAIM_DELIVERIES_SQL, NEXT_DELIVERY_DUE_SQL};
use serde::Deserialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Sqlite, SqlitePool};
use tempfile::TempDir;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

const DAY_MS: i64 = 24 * 3600 * 1000;

#[derive(Parser)]
struct Args {
    #[arg(value_enum)]
    scenario: Scenario,
    /// The `outrider` binary; default: `../outrider` from this program's directory.
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Callbacks: in all (burst, default 10,000), per receiver (isolation,
    /// default 500) or waiting (backlog, default 200,000).
    #[arg(long)]
    count: Option<usize>,
    /// How far in the future the burst falls due once the rows are written.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    lead: Duration,
    /// Extra `outrider serve` flags.
    #[arg(last = true)]
    serve_args: Vec<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Scenario {
    Burst,
    Isolation,
    Backlog,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let binary = match &args.binary {
        Some(binary) => binary.clone(),
        None => default_binary()?,
    };
    if !binary.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p outrider --bins`",
            binary.display()
        );
    }
    if !args.serve_args.is_empty() {
        println!("serve flags: {}", args.serve_args.join(" "));
    }
    match args.scenario {
        Scenario::Burst => burst(&args, &binary, args.count.unwrap_or(10_000)).await,
        Scenario::Isolation => isolation(&args, &binary, args.count.unwrap_or(500)).await,
        Scenario::Backlog => backlog(&args, &binary, args.count.unwrap_or(200_000)).await,
    }
}

/// `target/release/outrider` when run as `target/release/examples/callback_load`.
fn default_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let release = exe
        .parent()
        .and_then(Path::parent)
        .context("locating the target directory")?;
    Ok(release.join("outrider"))
}

async fn burst(args: &Args, binary: &Path, count: usize) -> anyhow::Result<()> {
    let bench = Bench::create(binary)?;
    let receiver = Receiver::healthy(bench.tls.clone()).await?;
    let pool = bench.pool().await?;
    let due = fall_due(args, &pool, &bench.org_id, &[(receiver.addr, count)]).await?;

    let server = Server::start(binary, &bench, &args.serve_args)?;
    server.check_before(due);
    let cpu_before = cpu_ms(server.pid);
    let all = receiver.wait_for(count, Duration::from_secs(120)).await;
    let cpu = cpu_ms(server.pid) - cpu_before;
    let succeeded = wait_succeeded(&pool, count, Duration::from_secs(10)).await?;
    drop(server);

    let latencies = receiver.latencies_ms(due);
    println!(
        "burst: {} of {count} callbacks arrived, {} requests in all, {succeeded} recorded as succeeded",
        latencies.len(),
        receiver.requests.load(Ordering::Relaxed),
    );
    if !all {
        println!("  (stopped waiting after 120 s)");
    }
    let last = latencies.last().copied().unwrap_or_default();
    println!(
        "  due to last delivered {:.2} s = {:.0} callbacks/s",
        last / 1e3,
        latencies.len() as f64 / (last / 1e3)
    );
    print_latencies("  due to delivered", &latencies);
    println!("  server CPU time while delivering: {:.0} ms", cpu);
    Ok(())
}

async fn isolation(args: &Args, binary: &Path, count: usize) -> anyhow::Result<()> {
    let bench = Bench::create(binary)?;
    let hanging = Receiver::hanging(bench.tls.clone()).await?;
    let healthy = Receiver::healthy(bench.tls.clone()).await?;
    let pool = bench.pool().await?;
    // The hanging receiver's rows go first: the dispatcher claims in
    // next_attempt_at order, ties by insertion.
    let receivers = [(hanging.addr, count), (healthy.addr, count)];
    let due = fall_due(args, &pool, &bench.org_id, &receivers).await?;

    let server = Server::start(binary, &bench, &args.serve_args)?;
    server.check_before(due);
    let all = healthy.wait_for(count, Duration::from_secs(120)).await;
    let hung = hanging.connections.load(Ordering::Relaxed);
    drop(server);

    let latencies = healthy.latencies_ms(due);
    println!(
        "isolation: healthy receiver got {} of {count} callbacks; the hanging one held {hung} connections",
        latencies.len()
    );
    if !all {
        println!("  (stopped waiting after 120 s)");
    }
    print_latencies("  healthy receiver, due to delivered", &latencies);
    Ok(())
}

async fn backlog(args: &Args, binary: &Path, count: usize) -> anyhow::Result<()> {
    let mut runs = Vec::new();
    for waiting in [0, count] {
        let bench = Bench::create(binary)?;
        let pool = bench.pool().await?;
        // Nothing listens there; nothing falls due within the run anyway.
        let nowhere: SocketAddr = "127.0.0.1:9".parse()?;
        let started = Instant::now();
        insert(&pool, &bench.org_id, nowhere, waiting, now_ms() + 3_600_000).await?;
        if waiting > 0 {
            println!(
                "wrote {waiting} deliveries in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        pool.close().await;

        let server = Server::start(binary, &bench, &args.serve_args)?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let cpu_before = cpu_ms(server.pid);
        let run_before = run_ms(server.pid);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let cpu = cpu_ms(server.pid) - cpu_before;
        let run = run_ms(server.pid) - run_before;
        let (rss, hwm) = memory_kb(server.pid);
        drop(server);

        let pool = bench.pool().await?;
        let claim = time_query(&pool, Query::Claim).await?;
        let next_due = time_query(&pool, Query::NextDue).await?;
        if waiting == count {
            for (name, sql) in [
                ("claim", CLAIM_DELIVERIES_SQL),
                ("next due", NEXT_DELIVERY_DUE_SQL),
            ] {
                println!("query plan, {name}: {}", query_plan(&pool, sql).await?);
            }
        }
        let size = database_bytes(&bench.dir.path().join("outrider.db"));
        runs.push((waiting, rss, hwm, cpu, run, claim, next_due, size));
        pool.close().await;
    }
    println!("backlog: idle server, 10 s after start-up, sampled over the next 10 s");
    for (waiting, rss, hwm, cpu, run, claim, next_due, size) in &runs {
        println!(
            "  {waiting:>7} waiting (db {:.0} MB): RSS {:.1} MB (peak {:.1} MB), \
             CPU {cpu:.0} ms (run time {run:.1} ms) in 10 s, \
             claim {:.1} µs, next due {:.1} µs (mean of 100)",
            *size as f64 / 1e6,
            *rss as f64 / 1024.0,
            *hwm as f64 / 1024.0,
            claim.as_secs_f64() * 1e6,
            next_due.as_secs_f64() * 1e6,
        );
    }
    if let [empty, full] = &runs[..] {
        println!(
            "  RSS grows by {:.1} MB with the backlog",
            (full.1 as f64 - empty.1 as f64) / 1024.0
        );
    }
    Ok(())
}

/// A fresh database with one organisation, and certificates for receivers.
struct Bench {
    dir: TempDir,
    database_url: String,
    ca_file: PathBuf,
    tls: Arc<rustls::ServerConfig>,
    org_id: String,
}

impl Bench {
    fn create(binary: &Path) -> anyhow::Result<Bench> {
        let dir = tempfile::tempdir()?;
        let database_url = format!("sqlite://{}", dir.path().join("outrider.db").display());
        let (ca_pem, tls) = certificates()?;
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca_pem)?;
        let output = Command::new(binary)
            .args(["org", "create", "bench", "--json", "--database-url"])
            .arg(&database_url)
            .output()?;
        if !output.status.success() {
            bail!(
                "outrider org create failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        #[derive(Deserialize)]
        struct Created {
            org_id: String,
        }
        let created: Created = serde_json::from_slice(&output.stdout)?;
        Ok(Bench {
            dir,
            database_url,
            ca_file,
            tls,
            org_id: created.org_id,
        })
    }

    /// A connection opened the way the server opens its own.
    async fn pool(&self) -> anyhow::Result<SqlitePool> {
        let options = SqliteConnectOptions::from_str(&self.database_url)?
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10));
        Ok(SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?)
    }
}

/// Writes `count` pending deliveries to `addr`, due at `due`, in one transaction.
async fn insert(
    pool: &SqlitePool,
    org_id: &str,
    addr: SocketAddr,
    count: usize,
    due: i64,
) -> anyhow::Result<()> {
    let url = format!("https://{addr}/hooks/outrider");
    let destination = addr.to_string();
    let agent_id = new_id();
    let created_at = now_ms();
    let mut tx = pool.begin().await?;
    let mut written = 0;
    while written < count {
        let chunk = (count - written).min(1000);
        let rows = (written..written + chunk).map(|n| {
            let id = new_id();
            let session_id = new_id();
            let body = callback_body(&id, &session_id, &agent_id, n);
            (id, session_id, body)
        });
        let mut insert: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO deliveries (id, session_id, org_id, url, destination, body, status,
                                     attempts, next_attempt_at, deadline_at, created_at) ",
        );
        insert.push_values(rows, |mut row, (id, session_id, body)| {
            row.push_bind(id)
                .push_bind(session_id)
                .push_bind(org_id)
                .push_bind(&url)
                .push_bind(&destination)
                .push_bind(body)
                .push_bind("pending")
                .push_bind(0)
                .push_bind(due)
                .push_bind(due + DAY_MS)
                .push_bind(created_at);
        });
        insert.build().execute(&mut *tx).await?;
        written += chunk;
    }
    tx.commit().await?;
    Ok(())
}

/// A callback body as a finished session leaves it, about 320 bytes.
fn callback_body(id: &str, session_id: &str, agent_id: &str, n: usize) -> Vec<u8> {
    let body = serde_json::json!({
        "callback_event_id": id,
        "session_id": session_id,
        "agent_id": agent_id,
        "status": "succeeded",
        "completed_at": "2026-05-04T12:00:00.000Z",
        "events_url": format!("http://127.0.0.1:8080/v1/agent-sessions/{session_id}/events"),
        "output": "2 + 3 = 5",
        "metadata": {"order_id": n},
    });
    serde_json::to_vec(&body).expect("a JSON value serialises")
}

/// Makes every delivery fall due at `due`, with its deadline a day later.
/// Writes `count` deliveries to each receiver, in order, then makes them
/// all fall due `--lead` from now (writing takes a while); returns when.
async fn fall_due(
    args: &Args,
    pool: &SqlitePool,
    org_id: &str,
    receivers: &[(SocketAddr, usize)],
) -> anyhow::Result<i64> {
    for &(addr, count) in receivers {
        insert(pool, org_id, addr, count, now_ms() + 3_600_000).await?;
    }
    let due = now_ms() + args.lead.as_millis() as i64;
    set_due(pool, due).await?;
    Ok(due)
}

async fn set_due(pool: &SqlitePool, due: i64) -> anyhow::Result<()> {
    sqlx::query("UPDATE deliveries SET next_attempt_at = ?1, deadline_at = ?1 + ?2")
        .bind(due)
        .bind(DAY_MS)
        .execute(pool)
        .await?;
    Ok(())
}

/// Waits until `count` deliveries are recorded as succeeded; returns how many are.
async fn wait_succeeded(pool: &SqlitePool, count: usize, within: Duration) -> anyhow::Result<i64> {
    let until = Instant::now() + within;
    loop {
        let succeeded: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM deliveries WHERE status = 'succeeded'")
                .fetch_one(pool)
                .await?;
        if succeeded as usize >= count || Instant::now() > until {
            return Ok(succeeded);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[derive(Clone, Copy)]
enum Query {
    Claim,
    NextDue,
}

/// The mean of 100 runs of one of the dispatcher's poll queries, after 10 to warm up.
async fn time_query(pool: &SqlitePool, query: Query) -> anyhow::Result<Duration> {
    let mut total = Duration::ZERO;
    for n in 0..110 {
        let started = Instant::now();
        match query {
            Query::Claim => {
                let now = now_ms();
                sqlx::query(CLAIM_DELIVERIES_SQL)
                    .bind("bench")
                    .bind(now + 20_000)
                    .bind(now)
                    .bind(64)
                    .bind(16)
                    .bind("[]")
                    .bind(256)
                    .fetch_all(pool)
                    .await?;
            }
            Query::NextDue => {
                let _: Option<i64> = sqlx::query_scalar(NEXT_DELIVERY_DUE_SQL)
                    .fetch_one(pool)
                    .await?;
            }
        }
        if n >= 10 {
            total += started.elapsed();
        }
    }
    Ok(total / 100)
}

/// SQLite's plan for `sql`, one step per `;`.
async fn query_plan(pool: &SqlitePool, sql: &str) -> anyhow::Result<String> {
    let explain = format!("EXPLAIN QUERY PLAN {sql}");
    let mut query = sqlx::query_as::<_, (i64, i64, i64, String)>(&explain);
    if sql.contains("?1") {
        query = query.bind("bench").bind(0).bind(0).bind(64).bind("[]");
    }
    let rows = query.fetch_all(pool).await?;
    let steps: Vec<String> = rows.into_iter().map(|(_, _, _, step)| step).collect();
    Ok(steps.join("; "))
}

fn database_bytes(path: &Path) -> u64 {
    ["", "-wal"]
        .iter()
        .filter_map(|suffix| std::fs::metadata(format!("{}{suffix}", path.display())).ok())
        .map(|meta| meta.len())
        .sum()
}

/// The `outrider serve` child process, killed when dropped.
struct Server {
    child: Child,
    pid: u32,
}

impl Server {
    fn start(binary: &Path, bench: &Bench, extra: &[String]) -> anyhow::Result<Server> {
        let log = std::fs::File::create(bench.dir.path().join("outrider.log"))?;
        let mut child = Command::new(binary)
            .args(["serve", "--listen", "127.0.0.1:0", "--database-url"])
            .arg(&bench.database_url)
            .args(["--callback-allow", "127.0.0.0/8", "--callback-ca-file"])
            .arg(&bench.ca_file)
            .args(["--workers", "0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let pid = child.id();
        let stdout = child.stdout.take().context("the server's stdout")?;
        let (first, line) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = first.send(lines.next());
            // Keep reading so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let server = Server { child, pid };
        let line = line.recv_timeout(Duration::from_secs(30));
        match line {
            Ok(Some(Ok(line))) if line.starts_with("outrider listening on http://") => Ok(server),
            other => {
                let log = std::fs::read_to_string(bench.dir.path().join("outrider.log"))?;
                bail!("the server did not start ({other:?}): {log}")
            }
        }
    }

    /// Warns when start-up took longer than the lead before the rows fall due.
    fn check_before(&self, due: i64) {
        let left = due - now_ms();
        if left < 0 {
            println!("warning: the server was up {} ms after the due time", -left);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTPS receiver in this process.
struct Receiver {
    addr: SocketAddr,
    /// First arrival of each `callback_event_id`, in microseconds since the epoch.
    arrivals: Arc<Mutex<HashMap<String, i64>>>,
    /// Distinct callbacks seen so far.
    seen: watch::Receiver<usize>,
    /// Requests in all, repeats included.
    requests: Arc<AtomicUsize>,
    /// TLS connections accepted.
    connections: Arc<AtomicUsize>,
}

#[derive(Deserialize)]
struct Callback {
    callback_event_id: String,
}

impl Receiver {
    /// Answers every request `200` at once and records when it arrived.
    async fn healthy(tls: Arc<rustls::ServerConfig>) -> anyhow::Result<Receiver> {
        Self::start(tls, true).await
    }

    /// Completes the TLS handshake, reads whatever comes and never answers.
    async fn hanging(tls: Arc<rustls::ServerConfig>) -> anyhow::Result<Receiver> {
        Self::start(tls, false).await
    }

    async fn start(tls: Arc<rustls::ServerConfig>, answers: bool) -> anyhow::Result<Receiver> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(tls);
        let arrivals = Arc::new(Mutex::new(HashMap::new()));
        let (seen_tx, seen) = watch::channel(0);
        let seen_tx = Arc::new(seen_tx);
        let requests = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let receiver = Receiver {
            addr,
            arrivals: arrivals.clone(),
            seen,
            requests: requests.clone(),
            connections: connections.clone(),
        };
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let acceptor = acceptor.clone();
                let (arrivals, seen_tx) = (arrivals.clone(), seen_tx.clone());
                let (requests, connections) = (requests.clone(), connections.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    connections.fetch_add(1, Ordering::Relaxed);
                    if !answers {
                        let mut buf = vec![0; 16 * 1024];
                        while matches!(tls.read(&mut buf).await, Ok(n) if n > 0) {}
                        return;
                    }
                    let service = service_fn(move |request| {
                        let (arrivals, seen_tx) = (arrivals.clone(), seen_tx.clone());
                        requests.fetch_add(1, Ordering::Relaxed);
                        record(request, arrivals, seen_tx)
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Ok(receiver)
    }

    /// Waits until `count` distinct callbacks arrived; false if `within` passed first.
    async fn wait_for(&self, count: usize, within: Duration) -> bool {
        let mut seen = self.seen.clone();
        let reached = tokio::time::timeout(within, seen.wait_for(|n| *n >= count)).await;
        matches!(reached, Ok(Ok(_)))
    }

    /// Milliseconds from `due` to each callback's first arrival, sorted.
    fn latencies_ms(&self, due: i64) -> Vec<f64> {
        let arrivals = self.arrivals.lock().expect("arrivals");
        let mut latencies: Vec<f64> = arrivals
            .values()
            .map(|at| (at - due * 1000) as f64 / 1e3)
            .collect();
        latencies.sort_by(f64::total_cmp);
        latencies
    }
}

async fn record(
    request: Request<Incoming>,
    arrivals: Arc<Mutex<HashMap<String, i64>>>,
    seen: Arc<watch::Sender<usize>>,
) -> Result<Response<Body>, Infallible> {
    let at = now_us();
    let body = axum::body::to_bytes(Body::new(request.into_body()), 1 << 20).await;
    if let Some(callback) = body
        .ok()
        .and_then(|body| serde_json::from_slice::<Callback>(&body).ok())
    {
        let mut arrivals = arrivals.lock().expect("arrivals");
        arrivals.entry(callback.callback_event_id).or_insert(at);
        seen.send_replace(arrivals.len());
    }
    Ok(Response::new(Body::from("ok")))
}

fn now_us() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock is after 1970");
    since.as_micros() as i64
}

fn print_latencies(label: &str, sorted: &[f64]) {
    let at = |q: f64| {
        let i = ((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1));
        sorted.get(i).copied().unwrap_or_default()
    };
    println!(
        "{label}: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (first {:.0} ms)",
        at(0.50),
        at(0.99),
        at(1.0),
        at(0.0)
    );
}

/// User plus system CPU time of the process, from `/proc/<pid>/stat`.
fn cpu_ms(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name, which may itself hold spaces: the
    // state is the first, utime the 12th and stime the 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    ticks * 1000.0 / clock_ticks()
}

/// Time spent running, summed over the process's threads, from
/// `/proc/<pid>/task/*/schedstat` (nanoseconds, so finer than `stat`'s ticks).
fn run_ms(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let ns: u64 = tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e6
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Resident memory now and at its peak, in KiB, from `/proc/<pid>/status`.
fn memory_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A fresh CA and a server configuration whose certificate it signed, for
/// the loopback names.
fn certificates() -> anyhow::Result<(String, Arc<rustls::ServerConfig>)> {
    let certificates = LoopbackCertificates::generate()?;
    let tls = server_tls(certificates.cert.as_bytes(), certificates.key.as_bytes())?;
    Ok((certificates.ca, tls))
}
