//! The files training writes: the llama.cpp LoRA adapter GGUF and the checkpoint a run resumes
//! from. Both are written beside their final name and renamed, so neither is ever half-written.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::model::{BaseInfo, Lora};
use super::{Adam, CheckpointState, TrainError};

/// Writes `bytes` to `path` through a temporary file beside it (created as any file is, so the
/// adapter gets the usual permissions), renamed once complete.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    replace_with(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| TrainError::io(tmp, e))
    })
}

/// Has `write` fill a temporary file beside `path`, syncs it, and renames it to `path`; on
/// failure the temporary file is removed and `path` is as it was.
fn replace_with(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), TrainError>,
) -> Result<(), TrainError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = std::path::PathBuf::from(tmp);
    let done = write(&tmp).and_then(|()| {
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| TrainError::io(path, e))
    });
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}

/// Writes the adapter as llama.cpp loads it: `general.type = adapter`, `adapter.type = lora`,
/// `adapter.lora.alpha`, the base's architecture, and f32 `…lora_a` (inputs × rank) and `…lora_b`
/// (rank × outputs) tensors, with where it came from.
pub fn write_adapter(
    path: &Path,
    base: &BaseInfo,
    lora: &Lora,
    base_sha256: &str,
    provenance: &serde_json::Value,
    metrics: &serde_json::Value,
) -> Result<(), TrainError> {
    let text = |s: &str| gguf_file::Value::String(s.to_string());
    let pairs_sha256 = provenance["pairs_files"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["sha256"].as_str())
        .map(text)
        .collect();
    let name = format!(
        "DPO LoRA adapter of {}",
        base.name.as_deref().unwrap_or("the base model")
    );
    let metadata: Vec<(&str, gguf_file::Value)> = vec![
        ("general.type", text("adapter")),
        ("general.architecture", text(&base.architecture)),
        ("general.name", text(&name)),
        ("adapter.type", text("lora")),
        (
            "adapter.lora.alpha",
            gguf_file::Value::F32(lora.alpha as f32),
        ),
        ("collabllm.base_model.sha256", text(base_sha256)),
        (
            "collabllm.pairs.sha256",
            gguf_file::Value::Array(pairs_sha256),
        ),
        ("collabllm.provenance", text(&provenance.to_string())),
        ("collabllm.metrics", text(&metrics.to_string())),
    ];
    let tensors = lora
        .named()
        .into_iter()
        .map(|(name, var)| {
            let t = var.as_tensor().to_dtype(candle_core::DType::F32)?;
            Ok((name, QTensor::quantize(&t, GgmlDType::F32)?))
        })
        .collect::<Result<Vec<_>, TrainError>>()?;
    let mut bytes = std::io::Cursor::new(Vec::new());
    gguf_file::write(
        &mut bytes,
        &metadata.iter().map(|(k, v)| (*k, v)).collect::<Vec<_>>(),
        &tensors
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .collect::<Vec<_>>(),
    )?;
    write_atomic(path, &bytes.into_inner())
}

const STATE_KEY: &str = "state.json";

/// Saves the adapter, the optimizer's moments and the run's state in one safetensors file.
pub(super) fn save_checkpoint(
    path: &Path,
    lora: &Lora,
    adam: &Adam,
    state: &CheckpointState,
) -> Result<(), TrainError> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (i, (name, var)) in lora.named().into_iter().enumerate() {
        tensors.insert(format!("{name}.adam_m"), adam.m[i].clone());
        tensors.insert(format!("{name}.adam_v"), adam.v[i].clone());
        tensors.insert(name, var.as_tensor().clone());
    }
    let json = serde_json::to_vec(state).expect("checkpoint state is JSON");
    let n = json.len();
    tensors.insert(STATE_KEY.into(), Tensor::from_vec(json, n, &Device::Cpu)?);
    replace_with(path, |tmp| {
        Ok(candle_core::safetensors::save(&tensors, tmp)?)
    })
}

/// Loads a checkpoint into `lora` and `adam` and returns the run's state.
pub(super) fn load_checkpoint(
    path: &Path,
    lora: &Lora,
    adam: &mut Adam,
) -> Result<CheckpointState, TrainError> {
    let bad = |reason: String| TrainError::Checkpoint {
        path: path.display().to_string(),
        reason,
    };
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| bad(format!("not readable ({e})")))?;
    let state = tensors
        .remove(STATE_KEY)
        .ok_or_else(|| bad("it holds no run state".into()))?
        .to_vec1::<u8>()?;
    let state: CheckpointState = serde_json::from_slice(&state)
        .map_err(|e| bad(format!("its run state is invalid ({e})")))?;
    for (i, (name, var)) in lora.named().into_iter().enumerate() {
        let mut take = |key: String| {
            tensors
                .remove(&key)
                .filter(|t| t.dims() == var.as_tensor().dims())
                .ok_or_else(|| bad(format!("`{key}` is missing or has another shape")))
        };
        let value = take(name.clone())?;
        adam.m[i] = take(format!("{name}.adam_m"))?;
        adam.v[i] = take(format!("{name}.adam_v"))?;
        var.set(&value)?;
    }
    Ok(state)
}
