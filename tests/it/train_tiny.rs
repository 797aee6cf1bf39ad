//! LoRA training on the tiny model: a fresh adapter is a no-op, gradients are right, loss falls,
//! the base stays frozen, resume continues the same run, PEFT files round-trip, bad input is
//! named.

use crate::helpers::{full_logits, load, max_abs_diff, tiny};
use candle_core::{Device, Tensor, Var};
use std::path::Path;
use tuneshop::lora::{peft, LoraConfig};
use tuneshop::model::{BaseModel, ComputeDtype, Mode, NoLora, Proj};
use tuneshop::train::data::{parse_jsonl, tokenize};
use tuneshop::train::lora_vars::LoraVars;
use tuneshop::train::{
    loss_of, supervised_nll, DataError, Example, Progress, Silent, TrainError, TrainObserver,
    TrainParams, Trainer,
};

const MEMORIZE: &str = r#"{"prompt":"the capital of france is","completion":" paris"}
{"prompt":"the quick brown fox","completion":" jumps over the lazy dog"}
{"prompt":"hello","completion":" world, this is a tiny model"}
{"prompt":"what is the capital","completion":" of france? paris"}
"#;

const CHAT: &str = r#"{"messages":[{"role":"user","content":"positive or negative? the movie was great"},{"role":"assistant","content":"positive"}]}
{"messages":[{"role":"user","content":"positive or negative? the plot was thin"},{"role":"assistant","content":"negative"}]}
{"messages":[{"role":"system","content":"answer in one word"},{"role":"user","content":"the actors were fine"},{"role":"assistant","content":"positive"},{"role":"user","content":"and the plot?"},{"role":"assistant","content":"negative"}]}
"#;

const INSTRUCTIONS: &str = r#"{"instruction":"positive or negative?","input":"the actors were fine","output":"positive"}
{"instruction":"say hello","output":"hello world"}
"#;

fn examples(m: &BaseModel, jsonl: &str, max_len: usize) -> Result<Vec<Example>, DataError> {
    let rows = parse_jsonl(jsonl)?;
    Ok(tokenize(m, &rows, max_len, &|i| i + 1)?.0)
}

fn params(steps_epochs: usize) -> TrainParams {
    TrainParams {
        n_epochs: steps_epochs,
        batch_size: 2,
        learning_rate: 1e-2,
        lora_dropout: 0.0,
        target_modules: vec!["all-linear".into()],
        warmup_steps: 0,
        checkpoint_every: 0,
        lr_scheduler: tuneshop::train::LrSchedule::Constant,
        seed: 7,
        max_seq_len: 128,
        ..Default::default()
    }
}

fn trainer<'a>(m: &'a BaseModel, p: TrainParams, data: Vec<Example>) -> Trainer<'a> {
    let lora = p.validate(m.llama.config()).unwrap();
    Trainer::new(m, p, lora, data, vec![], "tiny").unwrap()
}

#[derive(Default)]
struct Record {
    losses: Vec<f64>,
    stop_after: Option<usize>,
}

impl TrainObserver for Record {
    fn on_progress(&mut self, p: &Progress) {
        self.losses.push(p.train_loss);
    }
    fn should_stop(&self) -> bool {
        self.stop_after.is_some_and(|n| self.losses.len() >= n)
    }
}

#[test]
fn a_fresh_adapter_changes_nothing() {
    let m = load(&tiny().gguf_quantized);
    let cfg = LoraConfig {
        targets: Proj::ALL.to_vec(),
        ..Default::default()
    };
    let vars = LoraVars::init(&cfg, m.llama.config(), 1, &Device::Cpu).unwrap();
    let adapter = vars.to_adapter("tiny").unwrap();
    let ids = m.tokenizer.encode("the quick brown fox", false).unwrap();
    let base = full_logits(&m, &ids);
    let input = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap();
    let with: Vec<Vec<f32>> = m
        .llama
        .forward(&input, &adapter.hook())
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    assert_eq!(base, with, "B starts at zero");
}

/// Loss through the training graph, and its gradient for every variable.
fn loss_and_grads(m: &BaseModel, vars: &LoraVars, data: &[Example]) -> (f64, Vec<Vec<f32>>) {
    let batch: Vec<&Example> = data.iter().collect();
    let (nll, _) =
        supervised_nll(m, &batch, &vars.hook(0), Mode::Train(ComputeDtype::F32)).unwrap();
    let grads = nll.backward().unwrap();
    let g = vars
        .named()
        .iter()
        .map(|(name, v)| {
            grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"))
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    (nll.to_scalar::<f32>().unwrap() as f64, g)
}

#[test]
fn gradients_of_a_and_b_match_finite_differences() {
    for path in [&tiny().hf_dir, &tiny().gguf_quantized] {
        let m = load(path);
        let data = examples(&m, MEMORIZE, 64).unwrap();
        let cfg = LoraConfig {
            dropout: 0.0,
            targets: Proj::ALL.to_vec(),
            ..Default::default()
        };
        let vars = LoraVars::init(&cfg, m.llama.config(), 3, &Device::Cpu).unwrap();
        // Non-zero B, so A's gradient is not trivially zero.
        for (_, (_, b)) in vars.vars.iter() {
            b.set(&(Tensor::randn(0f32, 0.05, b.shape(), &Device::Cpu).unwrap()))
                .unwrap();
        }
        let (_, grads) = loss_and_grads(&m, &vars, &data);
        let named = vars.named();
        let eps = 1e-2f32;
        let mut checked = 0;
        for (k, (name, var)) in named.iter().enumerate().step_by(3) {
            let values: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let i = (k * 7919) % values.len();
            let eval = |delta: f32| {
                let mut v = values.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let batch: Vec<&Example> = data.iter().collect();
                let (nll, _) = supervised_nll(&m, &batch, &vars.hook(0), Mode::Infer).unwrap();
                nll.to_scalar::<f32>().unwrap()
            };
            let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
            var.set(&Tensor::from_vec(values.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let analytic = grads[k][i];
            assert!(
                (numeric - analytic).abs() < 0.05 * (1.0 + analytic.abs()),
                "{}: {name}[{i}] numeric {numeric} vs analytic {analytic}",
                path.display()
            );
            checked += 1;
        }
        assert!(checked >= 10);
    }
}

#[test]
fn loss_falls_on_a_memorization_task_with_quantized_and_f32_bases() {
    for path in [&tiny().gguf_quantized, &tiny().hf_dir] {
        let m = load(path);
        let data = examples(&m, MEMORIZE, 64).unwrap();
        let before = loss_of(&m, &NoLora, &data).unwrap();
        let mut rec = Record::default();
        let out = trainer(&m, params(15), data.clone()).run(&mut rec).unwrap();
        let after = loss_of(&m, &out.adapter.hook(), &data).unwrap();
        assert_eq!(out.steps, 30);
        assert!(
            after < before * 0.5,
            "{}: loss {before} -> {after}",
            path.display()
        );
        assert!(rec.losses.last().unwrap() < &rec.losses[0]);
    }
}

#[test]
fn bf16_compute_follows_the_f32_loss_curve() {
    let m = load(&tiny().gguf_quantized);
    let data = examples(&m, MEMORIZE, 64).unwrap();
    let before = loss_of(&m, &NoLora, &data).unwrap();
    let mut curves = Vec::new();
    for (compute_dtype, gradient_checkpointing) in [
        (ComputeDtype::F32, false),
        (ComputeDtype::Bf16, false),
        (ComputeDtype::Bf16, true),
    ] {
        let p = TrainParams {
            compute_dtype,
            gradient_checkpointing,
            ..params(15)
        };
        let mut rec = Record::default();
        let out = trainer(&m, p, data.clone()).run(&mut rec).unwrap();
        let after = loss_of(&m, &out.adapter.hook(), &data).unwrap();
        assert!(
            after < before * 0.5,
            "{compute_dtype:?}: loss {before} -> {after}"
        );
        curves.push(rec.losses);
    }
    // Rounding differences compound at this learning rate, so only the first steps are
    // compared closely; both runs must converge (checked above).
    let (f32_curve, bf16_curve) = (&curves[0], &curves[1]);
    for (step, (a, b)) in f32_curve.iter().zip(bf16_curve).take(10).enumerate() {
        assert!(
            (a - b).abs() < 0.02 * a.abs(),
            "step {step}: f32 loss {a}, bf16 loss {b}"
        );
    }
    if tuneshop::model::bf16_available() {
        assert_ne!(f32_curve, bf16_curve, "bf16 arithmetic did not run");
    }
    // Recomputing layers in bf16 repeats the same arithmetic.
    for (a, b) in bf16_curve.iter().zip(&curves[2]) {
        assert!((a - b).abs() < 1e-4, "bf16 {a} vs bf16 recomputed {b}");
    }
}

#[test]
fn the_base_model_is_bit_identical_after_training() {
    let m = load(&tiny().gguf_quantized);
    let snapshot = |m: &BaseModel| -> Vec<Vec<f32>> {
        m.llama
            .hf_tensors()
            .unwrap()
            .into_iter()
            .map(|(_, _, t)| t.flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    };
    let before = snapshot(&m);
    let data = examples(&m, CHAT, 128).unwrap();
    trainer(&m, params(2), data).run(&mut Silent).unwrap();
    assert!(before == snapshot(&m), "frozen weights changed");
}

#[test]
fn resuming_from_a_checkpoint_continues_the_same_run() {
    let m = load(&tiny().gguf_quantized);
    let data = examples(&m, MEMORIZE, 64).unwrap();
    let p = TrainParams {
        lora_dropout: 0.1,
        checkpoint_every: 3,
        lr_scheduler: tuneshop::train::LrSchedule::Cosine,
        warmup_steps: 2,
        ..params(4)
    };
    let dir = tempfile::tempdir().unwrap();
    let mut straight = Record::default();
    let full = trainer(&m, p.clone(), data.clone())
        .with_checkpoints(dir.path().join("a"))
        .run(&mut straight)
        .unwrap();

    let mut first = Record {
        stop_after: Some(3),
        ..Default::default()
    };
    let err = trainer(&m, p.clone(), data.clone())
        .with_checkpoints(dir.path().join("b"))
        .run(&mut first)
        .err()
        .unwrap();
    assert!(matches!(err, TrainError::Cancelled { step: 3 }));
    let ck = tuneshop::train::checkpoint::latest(&dir.path().join("b")).unwrap();
    let mut resumed = trainer(&m, p, data).with_checkpoints(dir.path().join("b"));
    resumed.resume(&ck).unwrap();
    let mut rest = Record::default();
    let out = resumed.run(&mut rest).unwrap();

    let mut joined = first.losses.clone();
    joined.extend(&rest.losses);
    assert_eq!(joined, straight.losses, "the same loss curve");
    for (id, p) in &full.adapter.pairs {
        let q = &out.adapter.pairs[id];
        let same = |a: &Tensor, b: &Tensor| {
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        assert!(
            same(&p.a, &q.a) && same(&p.b, &q.b),
            "layer {} {:?}",
            id.layer,
            id.proj
        );
    }
}

#[test]
fn same_seed_and_data_give_the_same_adapter_bytes() {
    let m = load(&tiny().gguf_quantized);
    let data = examples(&m, CHAT, 128).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = TrainParams {
        lora_dropout: 0.05,
        ..params(2)
    };
    for run in ["a", "b"] {
        let out = trainer(&m, p.clone(), data.clone())
            .run(&mut Silent)
            .unwrap();
        peft::save(&out.adapter, &dir.path().join(run)).unwrap();
    }
    let bytes = |run: &str| std::fs::read(dir.path().join(run).join(peft::WEIGHTS_FILE)).unwrap();
    assert_eq!(bytes("a"), bytes("b"));
}

#[test]
fn recomputing_layers_trains_the_same_adapter_with_dropout() {
    let m = load(&tiny().gguf_quantized);
    let data = examples(&m, CHAT, 128).unwrap();
    let p = TrainParams {
        lora_dropout: 0.1,
        ..params(2)
    };
    let mut runs = Vec::new();
    for gradient_checkpointing in [false, true] {
        let p = TrainParams {
            gradient_checkpointing,
            ..p.clone()
        };
        let mut record = Record::default();
        let out = trainer(&m, p, data.clone()).run(&mut record).unwrap();
        runs.push((record.losses, out.adapter));
    }
    let (plain, recomputed) = (&runs[0], &runs[1]);
    assert_eq!(plain.0.len(), recomputed.0.len());
    for (a, b) in plain.0.iter().zip(&recomputed.0) {
        assert!(
            (a - b).abs() < 1e-4,
            "losses {:?} vs {:?}",
            plain.0,
            recomputed.0
        );
    }
    for (id, pair) in &plain.1.pairs {
        let other = &recomputed.1.pairs[id];
        for (x, y) in [(&pair.a, &other.a), (&pair.b, &other.b)] {
            let d = (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-4, "{id:?}: adapters differ by {d}");
        }
    }
}

fn safetensor_shapes(path: &Path) -> Vec<(String, Vec<usize>)> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let mut v: Vec<(String, Vec<usize>)> = tensors
        .into_iter()
        .map(|(k, t)| (k, t.dims().to_vec()))
        .collect();
    v.sort();
    v
}

#[test]
fn peft_files_round_trip_with_peft_keys_and_shapes() {
    let m = load(&tiny().gguf_quantized);
    let data = examples(&m, MEMORIZE, 64).unwrap();
    let p = TrainParams {
        lora_r: 4,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        ..params(1)
    };
    let out = trainer(&m, p, data).run(&mut Silent).unwrap();
    let dir = tempfile::tempdir().unwrap();
    peft::save(&out.adapter, dir.path()).unwrap();
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert_eq!(config["r"], 4);
    assert_eq!(config["bias"], "none");
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "down_proj"])
    );
    let shapes = safetensor_shapes(&dir.path().join("adapter_model.safetensors"));
    assert_eq!(shapes.len(), 2 * 3 * 2);
    assert!(shapes.contains(&(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".into(),
        vec![4, 64]
    )));
    assert!(shapes.contains(&(
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight".into(),
        vec![32, 4]
    )));
    assert!(shapes.contains(&(
        "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight".into(),
        vec![4, 128]
    )));
    let back = peft::load(dir.path(), m.llama.config(), &Device::Cpu).unwrap();
    assert_eq!(back.config, out.adapter.config);
    for (id, p) in &out.adapter.pairs {
        let q = &back.pairs[id];
        assert_eq!(p.a.to_vec2::<f32>().unwrap(), q.a.to_vec2::<f32>().unwrap());
        assert_eq!(p.b.to_vec2::<f32>().unwrap(), q.b.to_vec2::<f32>().unwrap());
    }
}

#[test]
fn merged_dense_export_equals_base_plus_adapter() {
    let m = load(&tiny().gguf_quantized);
    let data = examples(&m, MEMORIZE, 64).unwrap();
    let out = trainer(&m, params(3), data).run(&mut Silent).unwrap();
    let dir = tempfile::tempdir().unwrap();
    tuneshop::lora::merge::write_hf_dir(&m, Some(&out.adapter), dir.path()).unwrap();
    let merged = load(dir.path());
    let ids = m
        .tokenizer
        .encode("the capital of france is", false)
        .unwrap();
    assert_eq!(
        ids,
        merged
            .tokenizer
            .encode("the capital of france is", false)
            .unwrap()
    );
    let input = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap();
    let with: Vec<Vec<f32>> = m
        .llama
        .forward(&input, &out.adapter.hook())
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let dense = full_logits(&merged, &ids);
    for p in 0..ids.len() {
        assert!(max_abs_diff(&with[p], &dense[p]) < 1e-3, "position {p}");
    }
}

#[test]
fn bad_training_input_is_named() {
    let m = load(&tiny().gguf_quantized);
    assert!(matches!(examples(&m, "", 64), Err(DataError::Empty)));
    let err = examples(
        &m,
        "{\"prompt\":\"a\",\"completion\":\"b\"}\n{\"prompt\":\"a\"}\n",
        64,
    )
    .unwrap_err();
    assert_eq!(err.lines()[0].line, 2);
    assert!(err.to_string().contains("`completion`"), "{err}");
    // A prompt longer than max_seq_len leaves nothing to learn.
    let long = format!(
        "{{\"prompt\":\"{}\",\"completion\":\"x\"}}\n",
        "the quick brown fox ".repeat(20)
    );
    let err = examples(
        &m,
        &format!("{{\"prompt\":\"a\",\"completion\":\"b\"}}\n{long}"),
        16,
    )
    .unwrap_err();
    assert_eq!(err.lines()[0].line, 2);
    assert!(err.to_string().contains("max_seq_len"), "{err}");
    let cfg = m.llama.config();
    for (p, field) in [
        (
            TrainParams {
                target_modules: vec!["attn".into()],
                ..params(1)
            },
            "target_modules",
        ),
        (
            TrainParams {
                lora_r: 0,
                ..params(1)
            },
            "lora_r",
        ),
        (
            TrainParams {
                lora_r: cfg.hidden_size + 1,
                ..params(1)
            },
            "lora_r",
        ),
        (
            TrainParams {
                max_seq_len: 4096,
                ..params(1)
            },
            "max_seq_len",
        ),
    ] {
        assert_eq!(p.validate(cfg).unwrap_err().param, field);
    }
}

#[test]
fn chat_rows_supervise_only_assistant_turns() {
    let m = load(&tiny().gguf_quantized);
    let ex = examples(&m, CHAT, 128).unwrap();
    let tok = &m.tokenizer;
    let supervised_text = |e: &Example| -> String {
        let ids: Vec<u32> = e
            .tokens
            .iter()
            .zip(&e.supervised)
            .filter(|(_, s)| **s)
            .map(|(t, _)| *t)
            .collect();
        tok.decode(&ids, false).unwrap()
    };
    assert_eq!(supervised_text(&ex[0]), "positive<|im_end|>");
    assert_eq!(
        supervised_text(&ex[2]),
        "positive<|im_end|>negative<|im_end|>"
    );
    let full = tok.decode(&ex[0].tokens, false).unwrap();
    assert!(
        full.starts_with("<|im_start|>user\npositive or negative?"),
        "{full}"
    );
    let ins = examples(&m, INSTRUCTIONS, 128).unwrap();
    assert_eq!(supervised_text(&ins[0]), "positive<|im_end|>");
    assert!(tok
        .decode(&ins[0].tokens, false)
        .unwrap()
        .contains("positive or negative?\n\nthe actors were fine"));
}

#[test]
fn every_variable_is_a_var_the_optimizer_sees() {
    // A guard for the silent-gradient pitfall: the training graph reaches every LoRA matrix.
    let m = load(&tiny().gguf_quantized);
    let data = examples(&m, CHAT, 128).unwrap();
    let cfg = LoraConfig {
        targets: Proj::ALL.to_vec(),
        ..Default::default()
    };
    let vars = LoraVars::init(&cfg, m.llama.config(), 5, &Device::Cpu).unwrap();
    let (_, grads) = loss_and_grads(&m, &vars, &data);
    assert_eq!(grads.len(), 2 * 7 * 2);
    // B starts at zero, so A's gradient is zero; B's must not be.
    let named = vars.named();
    for ((name, _), g) in named.iter().zip(&grads) {
        if name.contains("lora_B") {
            assert!(g.iter().any(|v| *v != 0.0), "{name} got a zero gradient");
        }
    }
    let _: Option<Var> = None;
}
