//! The engines of a running process, by name: one per protocol model, plus one per
//! (model, LoRA adapter) pair, since llama.cpp applies adapters per context. Each GGUF file is
//! loaded once and shared by the workers that use it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::llama::{self, LlamaEngine, LoadedModel, WorkerConfig};
use super::remote::RemoteEngine;
use super::{Engine, EngineError, EngineStatus};
use crate::protocol::{LoraSpec, ModelSpec, Protocol};

#[derive(Clone, Default)]
pub struct Engines {
    inner: Arc<RwLock<Inner>>,
}

#[derive(Default)]
struct Inner {
    engines: BTreeMap<String, Arc<dyn Engine>>,
    /// What each name was started from, to catch two protocols defining one name differently.
    origins: HashMap<String, String>,
    models: HashMap<PathBuf, Arc<LoadedModel>>,
}

/// The engine name of an arm: its model id, with the adapter when it has one.
pub fn engine_name(model_id: &str, lora: Option<&LoraSpec>) -> String {
    match lora {
        None => model_id.to_string(),
        Some(l) => format!("{model_id}+lora:{}@{}", l.file.display(), l.scale),
    }
}

impl Engines {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts every engine the protocol's arms use that is not running yet.
    pub fn load_protocol(&self, protocol: &Protocol, models_dir: &Path) -> Result<(), EngineError> {
        for arm in &protocol.arms {
            let spec = protocol
                .model(&arm.model)
                .ok_or_else(|| EngineError::UnknownModel {
                    model: arm.model.clone(),
                    available: protocol
                        .models
                        .iter()
                        .map(|m| m.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
            self.start(
                spec,
                models_dir,
                arm.lora.first(),
                protocol.slots_for(&spec.id),
            )?;
        }
        Ok(())
    }

    /// Starts the engine for one model (and adapter), unless it runs already.
    pub fn start(
        &self,
        spec: &ModelSpec,
        models_dir: &Path,
        lora: Option<&LoraSpec>,
        slots: u32,
    ) -> Result<(), EngineError> {
        let name = engine_name(&spec.id, lora);
        let lora = lora.map(|l| (resolve(models_dir, &l.file), l.scale));
        // What the model is; context size and slots are serving settings, set by the first
        // protocol that starts the model.
        let origin = format!(
            "{:?}|{:?}|{:?}",
            spec.file, spec.endpoint, spec.remote_model
        );
        let known_model = {
            let inner = self.inner.read().expect("engines lock");
            if let Some(existing) = inner.origins.get(&name) {
                return check_origin(existing, &origin, &spec.id);
            }
            spec.resolved_file(models_dir)
                .and_then(|path| inner.models.get(&path).cloned())
                .filter(|m| lora.as_ref().is_none_or(|(f, _)| m.has_adapter(f)))
        };
        // Loading a model and creating its context take seconds: done without the lock, so
        // requests to the running engines go on meanwhile.
        let (engine, model): (Arc<dyn Engine>, _) = match spec.resolved_file(models_dir) {
            Some(path) => {
                let model = match known_model {
                    Some(m) => m,
                    None => {
                        let adapters: Vec<PathBuf> = lora.iter().map(|(f, _)| f.clone()).collect();
                        llama::load_model(&path, spec.sha256.as_deref(), &adapters)?
                    }
                };
                let config = WorkerConfig {
                    name: name.clone(),
                    context_tokens: spec.context_tokens,
                    slots,
                    lora,
                    reuse_prefix: true,
                    saved_cache_bytes: spec.saved_cache_mib as usize * 1024 * 1024,
                    time_slice_tokens: spec.time_slice_tokens,
                    flash_attention: spec.flash_attention,
                };
                let engine = Arc::new(LlamaEngine::spawn(model.clone(), config)?);
                (engine, Some((path, model)))
            }
            None => (Arc::new(RemoteEngine::from_spec(spec)?), None),
        };
        let mut inner = self.inner.write().expect("engines lock");
        if let Some(existing) = inner.origins.get(&name) {
            // Started by another caller meanwhile; theirs serves, this one is dropped.
            return check_origin(existing, &origin, &spec.id);
        }
        if let Some((path, model)) = model {
            inner.models.insert(path, model);
        }
        inner.engines.insert(name.clone(), engine);
        inner.origins.insert(name, origin);
        Ok(())
    }

    /// Registers an engine under a name (a remote client, or a scripted engine in tests). It
    /// serves that name whatever a protocol says the model is: starting the name again keeps it.
    pub fn insert(&self, name: &str, engine: Arc<dyn Engine>) {
        let mut inner = self.inner.write().expect("engines lock");
        inner.origins.insert(name.to_string(), INSERTED.to_string());
        inner.engines.insert(name.to_string(), engine);
    }

    pub fn get(&self, name: &str) -> Result<Arc<dyn Engine>, EngineError> {
        let inner = self.inner.read().expect("engines lock");
        inner
            .engines
            .get(name)
            .cloned()
            .ok_or_else(|| EngineError::UnknownModel {
                model: name.to_string(),
                available: inner.engines.keys().cloned().collect::<Vec<_>>().join(", "),
            })
    }

    pub fn names(&self) -> Vec<String> {
        let inner = self.inner.read().expect("engines lock");
        inner.engines.keys().cloned().collect()
    }

    pub fn statuses(&self) -> Vec<EngineStatus> {
        let inner = self.inner.read().expect("engines lock");
        inner.engines.values().map(|e| e.status()).collect()
    }
}

/// The origin of an engine registered with [`Engines::insert`].
const INSERTED: &str = "inserted";

/// One name, one definition: a second protocol may not give a running model id another meaning.
fn check_origin(existing: &str, origin: &str, id: &str) -> Result<(), EngineError> {
    if existing == origin || existing == INSERTED {
        Ok(())
    } else {
        Err(EngineError::InvalidRequest(format!(
            "model id {id:?} is defined differently by two protocols; give one of them another id"
        )))
    }
}

fn resolve(models_dir: &Path, file: &Path) -> PathBuf {
    if file.is_absolute() {
        file.to_path_buf()
    } else {
        models_dir.join(file)
    }
}
