//! Server settings, read once at start from flags and `COLLABLLM_*` environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

/// Settings every command shares.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Database: a SQLite file (`sqlite://path` or a path) or `postgres://user@host/db`.
    #[arg(
        long,
        global = true,
        env = "COLLABLLM_DATABASE_URL",
        default_value = "sqlite://collabllm.sqlite3"
    )]
    pub database_url: String,

    /// Directory of GGUF models; relative model paths in protocols resolve against it.
    #[arg(
        long,
        global = true,
        env = "COLLABLLM_MODELS_DIR",
        default_value = "models"
    )]
    pub models_dir: PathBuf,

    /// Largest number of pooled database connections.
    #[arg(
        long,
        global = true,
        env = "COLLABLLM_DB_CONNECTIONS",
        default_value_t = 8
    )]
    pub db_connections: u32,
}

/// Settings of the web server.
#[derive(Debug, Clone, Args)]
pub struct ServeSettings {
    /// Address and port to listen on.
    #[arg(long, env = "COLLABLLM_BIND", default_value = "127.0.0.1:8080")]
    pub bind: SocketAddr,

    /// Protocol files to import at start (default: the embedded example protocol).
    #[arg(long = "protocol", env = "COLLABLLM_PROTOCOLS", value_delimiter = ',')]
    pub protocols: Vec<PathBuf>,

    /// HTTP worker threads (default: one per core).
    #[arg(long, env = "COLLABLLM_HTTP_WORKERS")]
    pub http_workers: Option<usize>,

    /// New participant sessions one client address may start per hour (0: no limit). A flood of
    /// sessions would skew balanced assignment and quotas.
    #[arg(
        long,
        env = "COLLABLLM_NEW_SESSIONS_PER_HOUR",
        default_value_t = collabllm::web::limits::DEFAULT_NEW_SESSIONS_PER_HOUR
    )]
    pub new_sessions_per_hour: usize,

    /// Keys of the OpenAI-compatible `/v1` API, comma-separated (keys made with `collabllm key
    /// add` work too). Without any key `/v1` is off.
    #[arg(
        long = "api-keys",
        env = "COLLABLLM_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,

    /// Take client addresses from `X-Forwarded-For`: set it behind a reverse proxy (else every
    /// participant shares the proxy's address); never without one (clients could forge it).
    #[arg(long, env = "COLLABLLM_TRUST_FORWARDED_FOR")]
    pub trust_forwarded_for: bool,
}
