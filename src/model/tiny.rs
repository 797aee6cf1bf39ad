//! A tiny deterministic random-weight LLaMA for tests: 2 layers, hidden 64, grouped-query
//! attention, a byte-level BPE vocabulary of about 300 tokens with a ChatML template. Written as
//! a Hugging Face directory (f32 safetensors), as an f32 GGUF and as a quantized GGUF (Q4_1
//! projections, Q8_0 embedding, like the default model), so every loader and kernel can be
//! checked in seconds.

use super::gguf::{GgmlType, GgufFile, GgufWriter, MetaValue};
use super::loader::permute_rows;
use super::quant::{QMatrix, QType};
use super::{ModelError, Tokenizer};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const HIDDEN: usize = 64;
pub const INTERMEDIATE: usize = 128;
pub const LAYERS: usize = 2;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const CONTEXT: usize = 256;
const MERGES: usize = 44;
const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const CORPUS: &str = "the quick brown fox jumps over the lazy dog. what is the capital of france? \
    the capital of france is paris. hello world, this is a tiny model for the tests of tuneshop. \
    positive or negative? the movie was great, the plot was thin, the actors were fine.";
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Paths of one generated model in its three forms.
pub struct TinyModel {
    pub hf_dir: PathBuf,
    pub gguf_f32: PathBuf,
    pub gguf_quantized: PathBuf,
}

/// GPT-2's byte-to-character table used by byte-level BPE.
fn byte_chars() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap_or('?')
            }
        })
        .collect()
}

/// Learns `MERGES` byte-level BPE merges on [`CORPUS`] (most frequent pair first, ties by text).
fn learn_merges(chars: &[char]) -> Vec<(String, String)> {
    let mut words: Vec<Vec<String>> = CORPUS
        .split(' ')
        .enumerate()
        .map(|(i, w)| {
            let text = if i == 0 {
                w.to_string()
            } else {
                format!(" {w}")
            };
            text.bytes()
                .map(|b| chars[b as usize].to_string())
                .collect()
        })
        .collect();
    let mut merges = Vec::with_capacity(MERGES);
    for _ in 0..MERGES {
        let mut counts: HashMap<(String, String), usize> = HashMap::new();
        for w in &words {
            for p in w.windows(2) {
                *counts.entry((p[0].clone(), p[1].clone())).or_default() += 1;
            }
        }
        let Some(best) = counts
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)))
            .map(|(pair, _)| pair)
        else {
            break;
        };
        for w in &mut words {
            let mut i = 0;
            while i + 1 < w.len() {
                if w[i] == best.0 && w[i + 1] == best.1 {
                    let joined = format!("{}{}", w[i], w[i + 1]);
                    w.splice(i..i + 2, [joined]);
                }
                i += 1;
            }
        }
        merges.push(best);
    }
    merges
}

struct Weights {
    embed: Vec<f32>,
    norm: Vec<f32>,
    /// Per layer: attn_norm, ffn_norm, then q, k, v, o, gate, up, down (HF layout).
    layers: Vec<[Vec<f32>; 9]>,
}

fn random_weights(vocab: usize, seed: u64) -> Weights {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut uniform = |n: usize, scale: f32| -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-scale..scale)).collect()
    };
    let (h, i) = (HIDDEN, INTERMEDIATE);
    let (q, kv) = (HEADS * (h / HEADS), KV_HEADS * (h / HEADS));
    let s_h = 1.0 / (h as f32).sqrt();
    let s_i = 1.0 / (i as f32).sqrt();
    let embed = uniform(vocab * h, 1.0);
    let layers = (0..LAYERS)
        .map(|_| {
            [
                uniform(h, 0.2).iter().map(|v| 1.0 + v).collect(),
                uniform(h, 0.2).iter().map(|v| 1.0 + v).collect(),
                uniform(q * h, 2.0 * s_h),
                uniform(kv * h, 2.0 * s_h),
                uniform(kv * h, s_h),
                uniform(h * q, s_h),
                uniform(i * h, s_h),
                uniform(i * h, s_h),
                uniform(h * i, s_i),
            ]
        })
        .collect();
    let norm = uniform(h, 0.2).iter().map(|v| 1.0 + v).collect();
    Weights {
        embed,
        norm,
        layers,
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes the tiny model (all three forms) under `dir`, deterministically from `seed`.
pub fn write(dir: &Path, seed: u64) -> Result<TinyModel, ModelError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let chars = byte_chars();
    let merges = learn_merges(&chars);
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    tokens.extend(chars.iter().map(|c| c.to_string()));
    tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    let vocab = tokens.len();
    let w = random_weights(vocab, seed);

    let gguf_f32 = dir.join("tiny-f32.gguf");
    let gguf_quantized = dir.join("tiny-q4_1.gguf");
    for (path, quantized) in [(&gguf_f32, false), (&gguf_quantized, true)] {
        write_gguf(path, &tokens, &merges, &w, quantized).map_err(io(path))?;
    }

    let hf_dir = dir.join("hf");
    std::fs::create_dir_all(&hf_dir).map_err(io(&hf_dir))?;
    let tokenizer = Tokenizer::from_gguf(&GgufFile::open(&gguf_f32)?)?;
    tokenizer.save(&hf_dir.join("tokenizer.json"))?;
    write_hf_files(&hf_dir, vocab, &w)?;
    Ok(TinyModel {
        hf_dir,
        gguf_f32,
        gguf_quantized,
    })
}

fn write_hf_files(dir: &Path, vocab: usize, w: &Weights) -> Result<(), ModelError> {
    let io = |path: PathBuf| move |source| ModelError::Io { path, source };
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": CONTEXT,
        "tie_word_embeddings": true,
        "bos_token_id": 1,
        "eos_token_id": 2,
    });
    let tok_config = serde_json::json!({
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "add_bos_token": false,
        "chat_template": CHAT_TEMPLATE,
    });
    for (name, json) in [
        ("config.json", config),
        ("tokenizer_config.json", tok_config),
    ] {
        let path = dir.join(name);
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&json).unwrap_or_default(),
        )
        .map_err(io(path))?;
    }
    let dev = Device::Cpu;
    let mut tensors = HashMap::new();
    let mut put = |name: String, v: &[f32], shape: &[usize]| -> Result<(), ModelError> {
        tensors.insert(name, Tensor::from_slice(v, shape, &dev)?);
        Ok(())
    };
    let (h, i) = (HIDDEN, INTERMEDIATE);
    let kv = KV_HEADS * (h / HEADS);
    put("model.embed_tokens.weight".into(), &w.embed, &[vocab, h])?;
    put("model.norm.weight".into(), &w.norm, &[h])?;
    let names = [
        ("input_layernorm", vec![h]),
        ("post_attention_layernorm", vec![h]),
        ("self_attn.q_proj", vec![h, h]),
        ("self_attn.k_proj", vec![kv, h]),
        ("self_attn.v_proj", vec![kv, h]),
        ("self_attn.o_proj", vec![h, h]),
        ("mlp.gate_proj", vec![i, h]),
        ("mlp.up_proj", vec![i, h]),
        ("mlp.down_proj", vec![h, i]),
    ];
    for (l, layer) in w.layers.iter().enumerate() {
        for ((name, shape), values) in names.iter().zip(layer) {
            put(format!("model.layers.{l}.{name}.weight"), values, shape)?;
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    Ok(())
}

fn write_gguf(
    path: &Path,
    tokens: &[String],
    merges: &[(String, String)],
    w: &Weights,
    quantized: bool,
) -> std::io::Result<()> {
    let mut g = GgufWriter::new();
    let s = |v: &str| MetaValue::String(v.to_string());
    let u = |v: usize| MetaValue::U32(v as u32);
    g.meta("general.architecture", s("llama"))
        .meta("general.name", s("tuneshop tiny test model"))
        .meta("llama.block_count", u(LAYERS))
        .meta("llama.context_length", u(CONTEXT))
        .meta("llama.embedding_length", u(HIDDEN))
        .meta("llama.feed_forward_length", u(INTERMEDIATE))
        .meta("llama.attention.head_count", u(HEADS))
        .meta("llama.attention.head_count_kv", u(KV_HEADS))
        .meta("llama.rope.freq_base", MetaValue::F32(10000.0))
        .meta("llama.rope.dimension_count", u(HIDDEN / HEADS))
        .meta(
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(1e-5),
        )
        .meta("llama.vocab_size", u(tokens.len()))
        .meta("tokenizer.ggml.model", s("gpt2"))
        .meta("tokenizer.ggml.pre", s("smollm"))
        .meta(
            "tokenizer.ggml.tokens",
            MetaValue::Array(tokens.iter().map(|t| s(t)).collect()),
        )
        .meta(
            "tokenizer.ggml.token_type",
            MetaValue::Array(
                (0..tokens.len())
                    .map(|i| MetaValue::I32(if i < SPECIALS.len() { 3 } else { 1 }))
                    .collect(),
            ),
        )
        .meta(
            "tokenizer.ggml.merges",
            MetaValue::Array(merges.iter().map(|(a, b)| s(&format!("{a} {b}"))).collect()),
        )
        .meta("tokenizer.ggml.bos_token_id", u(1))
        .meta("tokenizer.ggml.eos_token_id", u(2))
        .meta("tokenizer.ggml.add_bos_token", MetaValue::Bool(false))
        .meta("tokenizer.chat_template", s(CHAT_TEMPLATE));
    let (h, i) = (HIDDEN, INTERMEDIATE);
    let kv = KV_HEADS * (h / HEADS);
    let matrix = |g: &mut GgufWriter,
                  name: String,
                  v: &[f32],
                  rows: usize,
                  cols: usize,
                  qtype: QType,
                  heads: Option<usize>| {
        let (ty, bytes) = if quantized {
            let q = QMatrix::quantize(qtype, rows, cols, v);
            let ty = match qtype {
                QType::Q4_0 => GgmlType::Q4_0,
                QType::Q4_1 => GgmlType::Q4_1,
                QType::Q8_0 => GgmlType::Q8_0,
            };
            (ty, q.to_ggml_bytes())
        } else {
            (GgmlType::F32, f32_bytes(v))
        };
        let bytes = match heads {
            Some(n) => permute_rows(&bytes, rows, n),
            None => bytes,
        };
        g.tensor(&name, vec![cols, rows], ty, bytes);
    };
    matrix(
        &mut g,
        "token_embd.weight".into(),
        &w.embed,
        tokens.len(),
        h,
        QType::Q8_0,
        None,
    );
    g.tensor(
        "output_norm.weight",
        vec![h],
        GgmlType::F32,
        f32_bytes(&w.norm),
    );
    let shapes = [
        ("attn_q", h, h, Some(HEADS)),
        ("attn_k", kv, h, Some(KV_HEADS)),
        ("attn_v", kv, h, None),
        ("attn_output", h, h, None),
        ("ffn_gate", i, h, None),
        ("ffn_up", i, h, None),
        ("ffn_down", h, i, None),
    ];
    for (l, layer) in w.layers.iter().enumerate() {
        g.tensor(
            &format!("blk.{l}.attn_norm.weight"),
            vec![h],
            GgmlType::F32,
            f32_bytes(&layer[0]),
        );
        g.tensor(
            &format!("blk.{l}.ffn_norm.weight"),
            vec![h],
            GgmlType::F32,
            f32_bytes(&layer[1]),
        );
        for ((name, rows, cols, heads), values) in shapes.iter().zip(&layer[2..]) {
            matrix(
                &mut g,
                format!("blk.{l}.{name}.weight"),
                values,
                *rows,
                *cols,
                QType::Q4_1,
                *heads,
            );
        }
    }
    g.write(path)
}
