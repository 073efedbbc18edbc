//! Runs the real `outrider` binary on port 0 with its own SQLite file, and
//! talks to it over HTTP as a client would.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The built binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_outrider")
}

/// An organisation as `outrider org create --json` prints it.
#[derive(Debug, Clone)]
pub struct Org {
    pub org_id: String,
    pub api_key: String,
    pub signing_secret: String,
}

/// A running server process; killed when dropped.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:<port>`
    pub base: String,
    dir: tempfile::TempDir,
    args: Vec<String>,
    /// Environment variables set for the process, beyond the inherited ones.
    pub env: Vec<(String, String)>,
    /// What the process wrote to standard output after its first line.
    stdout: Arc<Mutex<String>>,
    pub http: reqwest::Client,
}

impl Server {
    /// Starts a server with test-friendly settings plus `extra` flags.
    ///
    /// Defaults: a fresh SQLite file, 1 s retries, a 2 s lease, no model
    /// fetching, each unless
    /// `extra` sets that flag itself.
    pub fn start(extra: &[&str]) -> Server {
        Self::start_with_env(extra, &[])
    }

    /// Like [`Server::start`], with extra environment variables.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let defaults = [
            ("--listen", "127.0.0.1:0"),
            ("--retry-schedule", "1s,1s,1s"),
            ("--lease", "2s"),
            // Only the local-model tests fetch the model, once, ahead of time.
            ("--model-pull", "off"),
        ];
        let mut args: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        for (flag, value) in defaults {
            if !extra.contains(&flag) {
                args.extend([flag.to_owned(), value.to_owned()]);
            }
        }
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (child, base, stdout) = spawn(dir.path(), &args, &env);
        Server {
            child,
            base,
            dir,
            args,
            env,
            stdout,
            http: http_client(),
        }
    }

    /// The database URL every process of this test shares.
    pub fn database_url(&self) -> String {
        database_url(self.dir.path())
    }

    /// The resident memory of the process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// Kills the process with SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits up to `within` for the process to exit;
    /// returns how long it took, or `None` if it was still running.
    pub fn terminate(&mut self, within: Duration) -> Option<Duration> {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(sent.expect("run kill").success());
        let started = Instant::now();
        while started.elapsed() < within {
            if self.child.try_wait().expect("poll the server").is_some() {
                return Some(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Starts the process again on the same database (new port).
    pub fn restart(&mut self) {
        self.kill();
        let (child, base, stdout) = spawn(self.dir.path(), &self.args, &self.env);
        self.child = child;
        self.base = base;
        self.stdout = stdout;
    }

    /// Waits up to `within` for standard output after the first line to
    /// contain `needle`, and returns all of it.
    pub fn wait_stdout(&self, needle: &str, within: Duration) -> String {
        let started = Instant::now();
        loop {
            let text = self.stdout.lock().expect("stdout buffer").clone();
            if text.contains(needle) || started.elapsed() > within {
                return text;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The directory holding the database (and files written beside it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Creates an organisation through the CLI.
    pub fn org(&self, name: &str) -> Org {
        let output = Command::new(binary())
            .args(["org", "create", name, "--json", "--database-url"])
            .arg(self.database_url())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run outrider org create");
        assert!(output.status.success(), "org create failed: {output:?}");
        let org: Value = serde_json::from_slice(&output.stdout).expect("org JSON");
        Org {
            org_id: org["org_id"].as_str().expect("org_id").to_owned(),
            api_key: org["api_key"].as_str().expect("api_key").to_owned(),
            signing_secret: org["signing_secret"].as_str().expect("secret").to_owned(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request and returns the status and the JSON body (or Null).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self.http.request(method, self.url(path));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request reaches the server");
        let status = response.status().as_u16();
        let bytes = response.bytes().await.expect("response body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    pub async fn get(&self, path: &str, key: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, Some(key), None).await
    }

    pub async fn post(&self, path: &str, key: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(key), Some(body))
            .await
    }

    /// Creates an agent and returns its id.
    pub async fn agent(&self, key: &str, spec: Value) -> String {
        let (status, body) = self.post("/v1/agents", key, spec).await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().expect("agent id").to_owned()
    }

    /// Creates a scripted agent that answers `text` at once.
    pub async fn echo_agent(&self, key: &str, text: &str) -> String {
        let spec = json!({
            "name": "echo",
            "model_provider": "scripted",
            "script": [{"content": text}],
        });
        self.agent(key, spec).await
    }

    /// Polls the session until `check` holds or `within` passes.
    pub async fn wait_session(
        &self,
        key: &str,
        session_id: &str,
        within: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let started = Instant::now();
        loop {
            let (status, body) = self
                .get(&format!("/v1/agent-sessions/{session_id}"), key)
                .await;
            if status == 200 && check(&body) {
                return body;
            }
            if started.elapsed() > within {
                panic!(
                    "session never got there; last {status} {body}\nlog:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn database_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("outrider.db").display())
}

/// Spawns `outrider serve` and reads the port from its first line; the rest
/// of its output is gathered into the returned buffer.
fn spawn(
    dir: &Path,
    args: &[String],
    env: &[(String, String)],
) -> (Child, String, Arc<Mutex<String>>) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))
        .expect("open server log");
    let mut child = Command::new(binary())
        .arg("serve")
        .args(["--database-url", &database_url(dir)])
        .args(args)
        .env("RUST_LOG", "info,outrider=debug")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn outrider serve");

    let stdout = child.stdout.take().expect("piped stdout");
    let mut stdout = BufReader::new(stdout);
    let mut line = String::new();
    stdout.read_line(&mut line).expect("read the listen line");
    // Keep reading, so the server never writes to a closed pipe.
    let rest = Arc::new(Mutex::new(String::new()));
    let gathered = rest.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        while matches!(stdout.read_line(&mut line), Ok(n) if n > 0) {
            gathered.lock().expect("stdout buffer").push_str(&line);
            line.clear();
        }
    });
    let base = line
        .trim()
        .strip_prefix("outrider listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}; log in {}", dir.display()))
        .to_owned();
    (child, base, rest)
}

/// A client for the API (plain HTTP; TLS is set up only to build it).
pub fn http_client() -> reqwest::Client {
    let tls = outrider::delivery::client::tls_config(None).expect("TLS config");
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .expect("HTTP client")
}
