//! The first start on an empty database: an organisation, an agent named
//! `assistant` on the local model, and the credentials to use them, shown
//! once and kept in a file only the owner can read.

use anyhow::Context;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::api::{generate_signing_secret, ApiKeyParts, DEFAULT_STEPS};
use crate::domain::{new_id, now_ms, rfc3339, Agent, AgentSpec, ModelProvider, ToolChoice};
use crate::providers::local::models::DEFAULT_MODEL;
use crate::secrets::SecretBox;
use crate::store::{self, DynStore, NewOrg};

/// What a first start created.
#[derive(Debug, Clone)]
pub struct FirstStart {
    pub org_id: String,
    pub api_key: String,
    pub signing_secret: String,
    pub agent_id: String,
    /// Where the credentials were written, if that worked.
    pub credentials_file: Option<PathBuf>,
}

/// Creates the default organisation and agent if the database has no
/// organisation; `None` if it had one.
pub async fn first_start(
    store: &DynStore,
    secrets: &SecretBox,
    database_url: &str,
) -> anyhow::Result<Option<FirstStart>> {
    let key = ApiKeyParts::generate();
    let signing_secret = generate_signing_secret();
    let org_id = new_id();
    let org = NewOrg {
        signing_secret: secrets.seal(&org_id, &signing_secret),
        id: org_id.clone(),
        name: "default".to_owned(),
        key_id: key.id.clone(),
        key_hash: key.hash.clone(),
    };
    let now = now_ms();
    let agent = Agent {
        id: new_id(),
        org_id: org_id.clone(),
        spec: assistant(),
        created_at: now,
        updated_at: now,
    };
    if !store.create_first_org(org, &agent).await? {
        return Ok(None);
    }
    tracing::info!(
        org.id = %org_id,
        agent.id = %agent.id,
        "first start: default organisation created"
    );

    let mut first = FirstStart {
        org_id,
        api_key: key.key,
        signing_secret,
        agent_id: agent.id,
        credentials_file: None,
    };
    let path = credentials_path(database_url);
    match write_private(&path, &first) {
        Ok(()) => first.credentials_file = Some(path),
        Err(error) => {
            tracing::warn!(file = %path.display(), "could not keep the credentials: {error:#}");
        }
    }
    Ok(Some(first))
}

fn assistant() -> AgentSpec {
    AgentSpec {
        name: "assistant".to_owned(),
        model_provider: ModelProvider::Local,
        model: DEFAULT_MODEL.to_owned(),
        system: None,
        max_steps: DEFAULT_STEPS,
        temperature: None,
        max_tokens: None,
        tools: Vec::new(),
        tool_choice: ToolChoice::Auto,
        script: Vec::new(),
    }
}

/// Beside the SQLite file (`outrider.db` gives `outrider.credentials.json`),
/// else in the working directory.
fn credentials_path(database_url: &str) -> PathBuf {
    let file = store::database_file(database_url);
    let stem = file
        .as_ref()
        .and_then(|f| f.file_stem())
        .map_or("outrider".into(), |s| s.to_string_lossy().into_owned());
    let dir = file
        .as_ref()
        .and_then(|f| f.parent())
        .map_or(PathBuf::new(), Path::to_path_buf);
    dir.join(format!("{stem}.credentials.json"))
}

/// Writes the credentials readable and writable by the owner only.
fn write_private(path: &Path, first: &FirstStart) -> anyhow::Result<()> {
    let body = json!({
        "org_id": first.org_id,
        "api_key": first.api_key,
        "signing_secret": first.signing_secret,
        "agent_id": first.agent_id,
        "created_at": rfc3339(now_ms()),
    });
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(0o600);
        // An older file keeps its mode when reopened; narrow it first.
        if path.exists() {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(file, "{}", serde_json::to_string_pretty(&body)?)?;
    file.sync_all()?;
    Ok(())
}

impl FirstStart {
    /// The text printed once, with a request ready to paste.
    pub fn banner(&self, base_url: &str) -> String {
        let kept = match &self.credentials_file {
            Some(path) => format!(
                "They are also in {} (readable only by you).",
                path.display()
            ),
            None => "Keep them now: they are not shown again.".to_owned(),
        };
        format!(
            "\nFirst start: created an organisation and an agent named \"assistant\" \
             on the local model.\n\
             \n  api key:        {key}\n  signing secret: {secret}\n  agent id:       {agent}\n\
             \n{kept}\nTry it:\n\
             \n  curl -s {base_url}/v1/agents/{agent}/interact \\\n    \
             -H 'Authorization: Bearer {key}' \\\n    \
             -d '{{\"message\": \"What is the capital of France?\"}}'\n",
            key = self.api_key,
            secret = self.signing_secret,
            agent = self.agent_id,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_sit_beside_the_database_file() {
        let cases = [
            ("sqlite://outrider.db", "outrider.credentials.json"),
            (
                "sqlite:///var/lib/o/prod.db",
                "/var/lib/o/prod.credentials.json",
            ),
            ("sqlite://data/x.sqlite?mode=rwc", "data/x.credentials.json"),
        ];
        for (url, want) in cases {
            assert_eq!(credentials_path(url), PathBuf::from(want), "{url}");
        }
    }
}
