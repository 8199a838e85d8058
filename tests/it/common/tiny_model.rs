//! A llama model small enough to write in a test: two layers 64 wide with random weights and a
//! byte-level vocabulary (every byte a token, and one merge: two spaces) with ChatML's control
//! tokens. llama.cpp
//! loads and runs it, and DPO trains adapters for it, in milliseconds: tests of whole pipelines
//! (the online loop) use it where the real model's text does not matter.

use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use collabllm::stats::SplitMix64;

const LAYERS: usize = 2;
const EMBEDDING: usize = 64;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const FEED_FORWARD: usize = 128;
/// ChatML's control tokens, before the 256 byte tokens.
const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// GPT-2's printable stand-in for each byte, as byte-level BPE vocabularies spell their tokens.
fn byte_token(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(b) {
        return char::from(b);
    }
    let shifted = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + shifted).expect("a code point below 512")
}

/// Writes the model to `path`; the same `seed` writes the same file.
pub fn write_tiny_model(path: &Path, seed: u64) {
    let mut rng = SplitMix64::new(seed);
    let mut tensor = |dims: &[usize], scale: f64, offset: f64| {
        let n: usize = dims.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| {
                let unit = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                (offset + scale * (unit * 2.0 - 1.0)) as f32
            })
            .collect();
        let t = Tensor::from_vec(data, dims, &Device::Cpu).unwrap();
        QTensor::quantize(&t, GgmlDType::F32).unwrap()
    };
    // GGUF has no type for an empty array of strings, so the vocabulary has one merge.
    let merged = format!("{0}{0}", byte_token(b' '));
    let vocab = SPECIALS.len() + 256 + 1;
    let head = EMBEDDING / HEADS;
    let mut tensors = vec![
        (
            "token_embd.weight".to_string(),
            tensor(&[vocab, EMBEDDING], 1.0, 0.0),
        ),
        (
            "output_norm.weight".to_string(),
            tensor(&[EMBEDDING], 0.2, 1.0),
        ),
        // Its own output projection, small enough that the next token is never near certain
        // (tied to the embedding, a random model repeats its last token forever).
        (
            "output.weight".to_string(),
            tensor(&[vocab, EMBEDDING], 0.3, 0.0),
        ),
    ];
    for l in 0..LAYERS {
        let linear = |name: &str, outputs: usize, inputs: usize| {
            (format!("blk.{l}.{name}.weight"), [outputs, inputs])
        };
        for (name, dims) in [
            linear("attn_q", EMBEDDING, EMBEDDING),
            linear("attn_k", KV_HEADS * head, EMBEDDING),
            linear("attn_v", KV_HEADS * head, EMBEDDING),
            linear("attn_output", EMBEDDING, EMBEDDING),
            linear("ffn_gate", FEED_FORWARD, EMBEDDING),
            linear("ffn_up", FEED_FORWARD, EMBEDDING),
            linear("ffn_down", EMBEDDING, FEED_FORWARD),
        ] {
            let scale = 1.0 / (dims[1] as f64).sqrt();
            tensors.push((name, tensor(&dims, scale, 0.0)));
        }
        for norm in ["attn_norm", "ffn_norm"] {
            tensors.push((
                format!("blk.{l}.{norm}.weight"),
                tensor(&[EMBEDDING], 0.2, 1.0),
            ));
        }
    }

    use gguf_file::Value;
    let tokens: Vec<Value> = SPECIALS
        .iter()
        .map(|s| s.to_string())
        .chain((0..=255u8).map(|b| byte_token(b).to_string()))
        .chain([merged])
        .map(Value::String)
        .collect();
    let types: Vec<Value> = (0..vocab)
        .map(|i| Value::I32(if i < SPECIALS.len() { 3 } else { 1 }))
        .collect();
    let u32 = |n: usize| Value::U32(n as u32);
    let metadata = [
        ("general.architecture", Value::String("llama".into())),
        ("general.name", Value::String("tiny random llama".into())),
        ("llama.context_length", u32(4096)),
        ("llama.embedding_length", u32(EMBEDDING)),
        ("llama.block_count", u32(LAYERS)),
        ("llama.feed_forward_length", u32(FEED_FORWARD)),
        ("llama.attention.head_count", u32(HEADS)),
        ("llama.attention.head_count_kv", u32(KV_HEADS)),
        ("llama.rope.dimension_count", u32(head)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("llama.vocab_size", u32(vocab)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("default".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        (
            "tokenizer.ggml.merges",
            Value::Array(vec![Value::String(format!("{0} {0}", byte_token(b' ')))]),
        ),
        ("tokenizer.ggml.bos_token_id", u32(1)),
        ("tokenizer.ggml.eos_token_id", u32(2)),
        ("tokenizer.ggml.padding_token_id", u32(0)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
    ];
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(
        &mut file,
        &metadata.iter().map(|(k, v)| (*k, v)).collect::<Vec<_>>(),
        &tensors
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .collect::<Vec<_>>(),
    )
    .unwrap();
}
