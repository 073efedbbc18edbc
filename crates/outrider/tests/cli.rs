//! The `outrider` command line: organisation creation, help, and settings
//! that must stop start-up.

mod support;

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::server::binary;

/// How long a bad setting may take to stop the process.
const STARTUP: Duration = Duration::from_secs(5);

/// A command for the binary with no `OUTRIDER_*` variable inherited.
fn outrider() -> Command {
    let mut command = Command::new(binary());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("OUTRIDER_") {
            command.env_remove(name);
        }
    }
    command.stdin(Stdio::null());
    command
}

fn database_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("x.db").display())
}

/// How a `serve` run ended.
struct Run {
    /// False when the process was still running after [`STARTUP`] and was killed.
    exited: bool,
    output: Output,
}

impl Run {
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    /// Asserts the process stopped by itself, unsuccessfully, and returns stderr.
    fn assert_refused(&self) -> String {
        let stderr = self.stderr();
        assert!(
            self.exited,
            "the server started and had to be killed; stderr:\n{stderr}"
        );
        assert!(
            !self.output.status.success(),
            "exit status 0; stderr:\n{stderr}"
        );
        let stdout = String::from_utf8_lossy(&self.output.stdout);
        assert!(!stdout.contains("listening"), "it listened: {stdout}");
        stderr
    }
}

/// Runs `outrider serve` on a fresh database, killing it after [`STARTUP`].
///
/// `--listen 127.0.0.1:0` is added unless `extra` sets `--listen` itself.
fn serve(extra: &[&str], env: &[(&str, &str)]) -> Run {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut command = outrider();
    command
        .arg("serve")
        .args(["--database-url", &database_url(dir.path())]);
    if !extra.contains(&"--listen") {
        command.args(["--listen", "127.0.0.1:0"]);
    }
    command
        .args(extra)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn outrider serve");

    let started = Instant::now();
    let exited = loop {
        if child.try_wait().expect("poll the child").is_some() {
            break true;
        }
        if started.elapsed() > STARTUP {
            let _ = child.kill();
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = child.wait_with_output().expect("collect output");
    Run { exited, output }
}

fn org_create(dir: &Path, name: &str) -> Output {
    outrider()
        .args(["org", "create", name, "--json", "--database-url"])
        .arg(database_url(dir))
        .output()
        .expect("run outrider org create")
}

#[test]
fn org_create_json_prints_exactly_org_id_api_key_and_signing_secret() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut orgs = Vec::new();
    for name in ["acme", "globex"] {
        let output = org_create(dir.path(), name);
        assert!(output.status.success(), "{output:?}");
        let org: Value = serde_json::from_slice(&output.stdout).expect("one JSON object");
        let object = org.as_object().expect("an object");
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["api_key", "org_id", "signing_secret"]);
        for (key, value) in object {
            let text = value
                .as_str()
                .unwrap_or_else(|| panic!("{key} is a string: {org}"));
            assert!(!text.is_empty(), "{key} is empty");
        }
        orgs.push(org);
    }
    for key in ["org_id", "api_key", "signing_secret"] {
        assert_ne!(orgs[0][key], orgs[1][key], "{key} differs between runs");
    }
    let api_key = orgs[0]["api_key"].as_str().expect("api_key");
    let secret = orgs[0]["signing_secret"].as_str().expect("signing_secret");
    assert_ne!(api_key, secret);
}

#[test]
fn the_database_is_created_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    assert!(org_create(dir.path(), "acme").status.success());
    for file in ["x.db", "x.db-wal"] {
        let path = dir.path().join(file);
        if file == "x.db" || path.exists() {
            let mode = std::fs::metadata(&path).expect(file).permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
    }
}

#[test]
fn commands_on_an_existing_database_refuse_a_missing_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = database_url(dir.path());
    let commands: [&[&str]; 4] = [
        &["callbacks", "list"],
        &["callbacks", "show", "x"],
        &["org", "rotate-secret", "x"],
        &["org", "set", "x", "--standard-webhooks", "on"],
    ];
    for command in commands {
        let output = outrider()
            .args(command)
            .args(["--database-url", &url])
            .output()
            .expect("run outrider");
        assert!(!output.status.success(), "{command:?}: {output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("there is no database at"), "{stderr}");
        assert!(!dir.path().join("x.db").exists(), "{command:?} made one");
    }
}

#[test]
fn output_into_a_pipe_closed_early_ends_quietly() {
    let dir = tempfile::tempdir().expect("temp dir");
    // `true` exits before outrider writes, so the write meets a closed pipe.
    let script = format!(
        "set -o pipefail; {} model list --models-dir {} | true",
        binary(),
        dir.path().display()
    );
    let output = Command::new("bash")
        .args(["-c", &script])
        .output()
        .expect("run bash");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(output.status.success(), "{output:?}");
}

#[test]
fn org_create_refuses_a_blank_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = org_create(dir.path(), "  ");
    assert!(!output.status.success(), "{output:?}");
    assert!(output.stdout.is_empty(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("name"), "{stderr}");
}

#[test]
fn help_lists_serve_and_org() {
    let output = outrider()
        .arg("--help")
        .output()
        .expect("run outrider --help");
    assert!(output.status.success(), "{output:?}");
    let help = String::from_utf8_lossy(&output.stdout);
    let commands: Vec<&str> = help
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    assert!(commands.contains(&"serve"), "{help}");
    assert!(commands.contains(&"org"), "{help}");
}

#[test]
fn a_retry_schedule_with_a_bad_duration_stops_start_up() {
    let stderr = serve(&["--retry-schedule", "5x"], &[]).assert_refused();
    assert!(stderr.contains("--retry-schedule"), "{stderr}");
    assert!(stderr.contains("5x"), "{stderr}");
}

#[test]
fn a_retry_schedule_from_the_environment_is_checked_too() {
    let env = [("OUTRIDER_RETRY_SCHEDULE", "bogus")];
    let stderr = serve(&[], &env).assert_refused();
    let named = stderr.contains("retry-schedule") || stderr.contains("OUTRIDER_RETRY_SCHEDULE");
    assert!(named, "{stderr}");
    assert!(stderr.contains("bogus"), "{stderr}");
}

#[test]
fn a_zero_callback_timeout_stops_start_up() {
    let stderr = serve(&["--callback-timeout", "0s"], &[]).assert_refused();
    assert!(stderr.contains("--callback-timeout"), "{stderr}");
}

#[test]
fn out_of_range_numbers_stop_start_up_instead_of_overflowing() {
    for (flag, value) in [
        ("--callback-timeout", "18446744073709551615s"),
        ("--callback-timeout", "500000000y"),
        ("--callback-deadline", "300000000y"),
        ("--retry-schedule", "5s,1000y"),
        ("--lease", "2h"),
        ("--workers", "18446744073709551615"),
        ("--workers", "5000"),
    ] {
        let stderr = serve(&[flag, value], &[]).assert_refused();
        assert!(stderr.contains(flag), "{flag} {value}: {stderr}");
    }
}

#[test]
fn a_callback_allow_entry_that_is_not_a_range_stops_start_up() {
    let stderr = serve(&["--callback-allow", "not_a_cidr"], &[]).assert_refused();
    assert!(stderr.contains("--callback-allow"), "{stderr}");
    assert!(stderr.contains("not_a_cidr"), "{stderr}");
}

#[test]
fn a_listen_value_that_is_not_an_address_stops_start_up() {
    let stderr = serve(&["--listen", "nope"], &[]).assert_refused();
    assert!(stderr.contains("--listen"), "{stderr}");
    assert!(stderr.contains("nope"), "{stderr}");
}

#[test]
fn a_public_url_that_is_not_http_stops_start_up() {
    let stderr = serve(&["--public-url", "ftp://x"], &[]).assert_refused();
    assert!(stderr.contains("--public-url"), "{stderr}");
    assert!(stderr.contains("ftp://x"), "{stderr}");
    for url in [
        "http://example.com/base?q=1",
        "http://example.com/#frag",
        "http://u@example.com",
    ] {
        let stderr = serve(&["--public-url", url], &[]).assert_refused();
        assert!(stderr.contains("--public-url"), "{url}: {stderr}");
    }
}

#[test]
fn a_missing_callback_ca_file_stops_start_up_naming_the_path() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("no-such-ca.pem");
    let missing = missing.to_str().expect("utf-8 path");
    let stderr = serve(&["--callback-ca-file", missing], &[]).assert_refused();
    assert!(stderr.contains(missing), "{stderr}");
}

#[test]
fn a_callback_ca_file_without_certificates_stops_start_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").expect("write the file");
    let empty = empty.to_str().expect("utf-8 path");
    let stderr = serve(&["--callback-ca-file", empty], &[]).assert_refused();
    assert!(stderr.contains(empty), "{stderr}");
}

#[test]
fn good_settings_start_the_server() {
    let run = serve(
        &[
            "--retry-schedule",
            "1s,2m",
            "--callback-allow",
            "10.0.0.0/8",
        ],
        &[],
    );
    let stdout = String::from_utf8_lossy(&run.output.stdout);
    assert!(
        !run.exited,
        "it stopped by itself; stderr:\n{}",
        run.stderr()
    );
    assert!(
        stdout.starts_with("outrider listening on http://127.0.0.1:"),
        "{stdout}"
    );
}

#[test]
fn sigterm_stops_the_server_promptly_and_cleanly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = outrider()
        .arg("serve")
        .args(["--database-url", &database_url(dir.path())])
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn outrider serve");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("piped stdout");
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
        .expect("read the listen line");
    assert!(line.starts_with("outrider listening on"), "{line}");
    // Long enough for the workers to go idle on an empty queue.
    std::thread::sleep(Duration::from_millis(1500));

    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(term.success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll the child") {
            break status;
        }
        if started.elapsed() > STARTUP {
            let _ = child.kill();
            panic!("the server was still running {STARTUP:?} after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}
