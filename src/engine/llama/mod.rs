//! The local backend: GGUF models loaded once through llama.cpp, and a worker thread per
//! (model, adapter) pair that owns the context and serves requests with continuous batching.

mod worker;

use std::collections::HashMap;
use std::io::Read;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{mpsc as std_mpsc, Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaLoraAdapter, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use sha2::{Digest, Sha256};

use super::{ChatRequest, Engine, EngineError, EngineStatus, Generation, Priority};

/// Tokens one decode call may carry (generating sequences + prompt chunks).
const BATCH_TOKENS: u32 = 1024;

/// The process-wide llama.cpp backend; llama.cpp allows one initialisation per process.
fn backend() -> Result<&'static LlamaBackend, EngineError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| EngineError::Load {
            path: String::new(),
            reason: e.clone(),
        })
}

/// The CPU kernels llama.cpp runs with, as it reports them (`CPU : SSE3 = 1 | AVX2 = 1 | …`).
/// Logged when the first model loads, so what a machine uses is on record; ggml's AMX kernels
/// are built out (see `.cargo/config.toml`) and must never be listed.
pub fn cpu_kernels() -> Result<String, EngineError> {
    backend()?;
    // SAFETY: llama_print_system_info takes no arguments and returns a pointer to a
    // NUL-terminated static buffer owned by llama.cpp, valid until its next call; it is copied
    // at once.
    let info = unsafe { std::ffi::CStr::from_ptr(llama_cpp_sys_2::llama_print_system_info()) };
    Ok(info.to_string_lossy().trim().to_string())
}

/// The cores, lent to one decode at a time. Every worker (each arm with an adapter, the
/// simulator, the judge) computes with every core; two computing at once would run twice the
/// threads on the same cores, and ggml's threads spin while they wait for each other, so both
/// would crawl. Taking turns step by step keeps each decode at full speed.
pub(crate) fn cpu_lease() -> std::sync::MutexGuard<'static, ()> {
    static CORES: Mutex<()> = Mutex::new(());
    CORES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Threads for llama.cpp: every core. (The crate's default of 4 on a 2-core machine is ~200×
/// slower than 2.)
pub fn thread_count() -> i32 {
    std::thread::available_parallelism()
        .map(|n| i32::try_from(n.get()).unwrap_or(1))
        .unwrap_or(1)
}

/// A GGUF model in memory with the LoRA adapters its policies use.
pub struct LoadedModel {
    pub model: LlamaModel,
    pub path: PathBuf,
    pub sha256: String,
    /// The longest text one token spells, to bound a prompt's tokens by its bytes.
    pub max_token_bytes: usize,
    adapters: HashMap<PathBuf, Mutex<LlamaLoraAdapter>>,
}

impl LoadedModel {
    pub fn has_adapter(&self, path: &Path) -> bool {
        self.adapters.contains_key(path)
    }
}

/// Loads a model once, checks its sha256 when one is expected, and initialises `adapters`.
pub fn load_model(
    path: &Path,
    expected_sha256: Option<&str>,
    adapters: &[PathBuf],
) -> Result<Arc<LoadedModel>, EngineError> {
    let fail = |reason: String| EngineError::Load {
        path: path.display().to_string(),
        reason,
    };
    let sha256 = file_sha256(path).map_err(|e| match super::fetch::Release::of_file(path) {
        Some(release) => fail(format!("{e}. Run `{}` to fetch it", release.fetch_command)),
        None => fail(format!(
            "{e}. Run `collabllm models fetch` for the default model or check the path"
        )),
    })?;
    if let Some(expected) = expected_sha256 {
        if !expected.eq_ignore_ascii_case(&sha256) {
            return Err(fail(format!(
                "the file is corrupt or a different model: sha256 {sha256}, expected {expected}. \
                 Delete it and run `collabllm models fetch` again, or update the protocol's sha256"
            )));
        }
    }
    static LOGGED: std::sync::Once = std::sync::Once::new();
    LOGGED.call_once(|| match cpu_kernels() {
        Ok(kernels) => tracing::info!(%kernels, "llama.cpp CPU kernels"),
        Err(e) => tracing::warn!(error = %e, "cannot read llama.cpp's CPU kernels"),
    });
    let started = Instant::now();
    let mut model = LlamaModel::load_from_file(backend()?, path, &LlamaModelParams::default())
        .map_err(|e| {
            fail(format!(
                "llama.cpp cannot load it ({e}); is it a valid GGUF model?"
            ))
        })?;
    let mut loaded_adapters = HashMap::new();
    for adapter in adapters {
        let a = model
            .lora_adapter_init(adapter)
            .map_err(|e| EngineError::Load {
                path: adapter.display().to_string(),
                reason: format!("not a LoRA adapter for this model ({e})"),
            })?;
        loaded_adapters.insert(adapter.clone(), Mutex::new(a));
    }
    let vocab = model.vocab();
    let max_token_bytes = (0..model.n_vocab())
        .map(|t| vocab.token_to_piece(LlamaToken(t), true, None).len())
        .max()
        .unwrap_or(1)
        .max(1);
    tracing::info!(path = %path.display(), %sha256, ms = started.elapsed().as_millis() as u64, "model loaded");
    Ok(Arc::new(LoadedModel {
        model,
        path: path.to_path_buf(),
        sha256,
        max_token_bytes,
        adapters: loaded_adapters,
    }))
}

/// sha256 of a file, computed once per (path, size, modification time) in this process.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    type Key = (PathBuf, u64, Option<SystemTime>);
    static CACHE: OnceLock<Mutex<HashMap<Key, String>>> = OnceLock::new();
    let meta = std::fs::metadata(path)?;
    let key = (path.to_path_buf(), meta.len(), meta.modified().ok());
    let cache = CACHE.get_or_init(Default::default);
    if let Some(hash) = cache.lock().expect("sha cache lock").get(&key) {
        return Ok(hash.clone());
    }
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let hash = hex::encode(hasher.finalize());
    cache
        .lock()
        .expect("sha cache lock")
        .insert(key, hash.clone());
    Ok(hash)
}

/// How a worker is set up.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Name in logs and status (the protocol's model id).
    pub name: String,
    /// Tokens one conversation may hold (prompt + reply).
    pub context_tokens: u32,
    /// Conversations held at once.
    pub slots: u32,
    /// Adapter applied to every request of this worker, with its scale.
    pub lora: Option<(PathBuf, f32)>,
    /// Reuse cached prompt prefixes across requests; off only for the benchmark's baseline.
    pub reuse_prefix: bool,
    /// Bytes of RAM for the caches of conversations evicted from their slot.
    pub saved_cache_bytes: usize,
    /// Tokens a reply streams after taking a slot before a participant waiting for a first token
    /// may pause it (its state kept in RAM until a slot frees); 0 never pauses.
    pub time_slice_tokens: u32,
    /// ggml's flash-attention kernel (the protocol's `flash_attention`).
    pub flash_attention: bool,
}

/// Handle to a worker thread. Dropping it lets the worker finish its requests and stop.
pub struct LlamaEngine {
    /// Jobs for the worker; a group arrives as one message, so the worker admits it together.
    jobs: std_mpsc::Sender<Vec<worker::Job>>,
    status: Arc<Mutex<EngineStatus>>,
    fingerprint: String,
    context_tokens: usize,
    /// The longest text one token of the model spells.
    max_token_bytes: usize,
    thread: std::thread::JoinHandle<()>,
}

impl LlamaEngine {
    /// Starts a worker with its own context on `model`; returns once the context exists.
    pub fn spawn(model: Arc<LoadedModel>, config: WorkerConfig) -> Result<Self, EngineError> {
        let (jobs, inbox) = std_mpsc::channel();
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let status = Arc::new(Mutex::new(EngineStatus {
            model: config.name.clone(),
            backend: "llama.cpp",
            slots: config.slots as usize,
            ..Default::default()
        }));
        let fingerprint = match &config.lora {
            Some((adapter, scale)) => {
                let adapter_sha = file_sha256(adapter).unwrap_or_default();
                format!("{}+lora:{adapter_sha}@{scale}", model.sha256)
            }
            None => model.sha256.clone(),
        };
        let thread_status = status.clone();
        let context_tokens = config.context_tokens;
        let max_token_bytes = model.max_token_bytes;
        let thread = std::thread::Builder::new()
            .name(format!("llama-{}", config.name))
            .spawn(move || serve(&model, &config, &inbox, &thread_status, ready_tx))
            .map_err(|e| EngineError::Inference(format!("cannot start worker thread: {e}")))?;
        ready_rx.recv().map_err(|_| EngineError::Stopped)??;
        Ok(Self {
            jobs,
            status,
            fingerprint,
            context_tokens: context_tokens as usize,
            max_token_bytes,
            thread,
        })
    }
}

/// The worker thread's life: a context, then a worker serving `inbox`. A worker that panics
/// (a bug, never a request: requests fail on their own) loses the requests it held; a new one
/// starts on a fresh context, and the restart is counted in the engine's status.
fn serve(
    model: &LoadedModel,
    config: &WorkerConfig,
    inbox: &std_mpsc::Receiver<Vec<worker::Job>>,
    status: &Arc<Mutex<EngineStatus>>,
    ready: std_mpsc::Sender<Result<(), EngineError>>,
) {
    let mut ready = Some(ready);
    loop {
        let context = match new_context(model, config) {
            Ok(c) => c,
            Err(e) => {
                match ready.take() {
                    Some(ready) => drop(ready.send(Err(e))),
                    None => {
                        tracing::error!(model = %config.name, error = %e, "the worker cannot restart")
                    }
                }
                return;
            }
        };
        if let Some(ready) = ready.take() {
            let _ = ready.send(Ok(()));
        }
        let worker = worker::Worker::new(model, context, config, status.clone());
        let Err(panic) =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run(inbox)))
        else {
            return;
        };
        let reason = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        tracing::error!(model = %config.name, %reason, "the worker failed; restarting it");
        status.clear_poison();
        let mut status = status.lock().expect("status lock");
        status.restarts += 1;
        status.last_failure = Some(reason);
        status.active = 0;
        status.paused = 0;
        status.queued = 0;
        status.queued_by_priority = [0; 3];
    }
}

fn new_context<'m>(
    model: &'m LoadedModel,
    config: &WorkerConfig,
) -> Result<llama_cpp_2::context::LlamaContext<'m>, EngineError> {
    let threads = thread_count();
    let total = config.context_tokens.saturating_mul(config.slots.max(1));
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(total))
        .with_n_batch(BATCH_TOKENS)
        .with_n_ubatch(BATCH_TOKENS.min(512))
        .with_n_seq_max(config.slots.max(1))
        .with_kv_unified(false)
        // Measured (docs/benchmarks.md): with ggml's CPU flash-attention kernel a
        // conversation's tenth turn takes ~1.4-1.6x its first; the plain attention path stays
        // flat (~1.1x), though short chats are ~10 % faster with the kernel.
        .with_flash_attention_policy(if config.flash_attention {
            llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED
        } else {
            llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED
        })
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut context =
        model
            .model
            .new_context(backend()?, params)
            .map_err(|e| EngineError::Load {
                path: model.path.display().to_string(),
                reason: format!("cannot create a context of {total} tokens ({e})"),
            })?;
    if let Some((path, scale)) = &config.lora {
        let adapter = model.adapters.get(path).ok_or_else(|| EngineError::Load {
            path: path.display().to_string(),
            reason: "adapter was not loaded with the model".into(),
        })?;
        let mut adapter = adapter.lock().expect("adapter lock");
        context
            .lora_adapter_set(&mut adapter, *scale)
            .map_err(|e| EngineError::Load {
                path: path.display().to_string(),
                reason: format!("cannot apply the adapter ({e})"),
            })?;
    }
    Ok(context)
}

/// llama.cpp's next-token logits at every position of `tokens` (one row each), with `adapter`
/// (loaded with `model`) applied at scale 1: what training compares its own forward pass with.
pub fn all_logits(
    model: &LoadedModel,
    adapter: Option<&Path>,
    tokens: &[u32],
) -> Result<Vec<Vec<f32>>, EngineError> {
    let n = u32::try_from(tokens.len())
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| EngineError::InvalidRequest("no tokens to score".into()))?;
    let config = WorkerConfig {
        name: "logits".into(),
        slots: 1,
        context_tokens: n,
        lora: adapter.map(|a| (a.to_path_buf(), 1.0)),
        reuse_prefix: false,
        saved_cache_bytes: 0,
        time_slice_tokens: 0,
        flash_attention: false,
    };
    let mut context = new_context(model, &config)?;
    let failed = |e: &dyn std::fmt::Display| EngineError::Load {
        path: model.path.display().to_string(),
        reason: format!("cannot score the tokens ({e})"),
    };
    let mut rows = Vec::with_capacity(tokens.len());
    for (chunk_index, chunk) in tokens.chunks(BATCH_TOKENS as usize).enumerate() {
        let mut batch = LlamaBatch::new(chunk.len(), 1);
        for (i, &t) in chunk.iter().enumerate() {
            let pos = (chunk_index * BATCH_TOKENS as usize + i) as i32;
            batch
                .add(LlamaToken(t as i32), pos, &[0], true)
                .map_err(|e| failed(&e))?;
        }
        {
            let _cores = cpu_lease();
            context.decode(&mut batch).map_err(|e| failed(&e))?;
        }
        for i in 0..chunk.len() {
            rows.push(context.get_logits_ith(i as i32).to_vec());
        }
    }
    Ok(rows)
}

impl LlamaEngine {
    /// Refuses, before anything is tokenised (and off the worker thread), a prompt whose text is
    /// too long for a conversation whatever its tokens: a few megabytes of text would otherwise
    /// hold the worker for seconds while every participant waits.
    fn check_size(&self, request: &ChatRequest) -> Result<(), EngineError> {
        let bytes: usize = request.messages.iter().map(|m| m.content.len()).sum();
        if bytes > self.context_tokens * self.max_token_bytes {
            return Err(EngineError::PromptTooLong {
                tokens: bytes / self.max_token_bytes,
                limit: self.context_tokens - 1,
            });
        }
        Ok(())
    }
}

impl Engine for LlamaEngine {
    fn start(&self, request: ChatRequest) -> Result<Generation, EngineError> {
        self.start_group(vec![request])
            .pop()
            .expect("one result per request")
    }

    fn start_group(&self, requests: Vec<ChatRequest>) -> Vec<Result<Generation, EngineError>> {
        let mut jobs = Vec::new();
        // Counted before sending: the worker takes a job off the count when it admits it.
        let mut status = self.status.lock().expect("status lock");
        let results: Vec<Result<Generation, EngineError>> = requests
            .into_iter()
            .map(|request| {
                request.check()?;
                self.check_size(&request)?;
                let class = request.priority;
                let queued = status.queued_by_priority[class.index()];
                if queued >= class.queue_limit() {
                    return Err(EngineError::Busy {
                        class: class.name(),
                        queued,
                    });
                }
                status.queued_by_priority[class.index()] += 1;
                status.queued += 1;
                let (generation, events, cancel) = Generation::channel();
                jobs.push(worker::Job {
                    request,
                    events,
                    cancel,
                    arrived: Instant::now(),
                    reported_ahead: None,
                });
                Ok(generation)
            })
            .collect();
        let classes: Vec<Priority> = jobs.iter().map(|j| j.request.priority).collect();
        if self.jobs.send(jobs).is_err() {
            for class in classes {
                status.queued -= 1;
                status.queued_by_priority[class.index()] -= 1;
            }
            return results
                .into_iter()
                .map(|r| r.and(Err(EngineError::Stopped)))
                .collect();
        }
        results
    }

    fn status(&self) -> EngineStatus {
        let mut status = self.status.lock().expect("status lock").clone();
        status.running = !self.thread.is_finished();
        status
    }

    fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }
}
