//! Adapters made by Hugging Face PEFT itself (tests/fixtures/peft, see make_peft_adapters.py)
//! load into tuneshop and give PyTorch's logits.

use crate::helpers::{load, max_abs_diff, tiny};
use candle_core::{Device, Tensor};
use std::path::Path;
use tuneshop::lora::peft;
use tuneshop::model::{BaseModel, LoraHook, NoLora};

fn fixture() -> serde_json::Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft/reference_logits.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn logits(m: &BaseModel, tokens: &[u32], hook: &dyn LoraHook) -> Vec<f32> {
    let input = Tensor::from_vec(tokens.to_vec(), (1, tokens.len()), &Device::Cpu).unwrap();
    let l = m.llama.forward(&input, hook).unwrap();
    l.flatten_all().unwrap().to_vec1().unwrap()
}

fn reference(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
        })
        .collect()
}

#[test]
fn peft_made_adapters_match_pytorch() {
    let fx = fixture();
    let tokens: Vec<u32> = fx["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let m = load(&tiny().hf_dir);
    let base = logits(&m, &tokens, &NoLora);
    let base_diff = max_abs_diff(&base, &reference(&fx["base"]));
    assert!(
        base_diff < 1e-4,
        "the tiny model differs from the one the fixture was made from ({base_diff}); \
         regenerate tests/fixtures/peft with make_peft_adapters.py"
    );
    for name in ["all_linear_r4", "qv_r2_rslora"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/peft")
            .join(name);
        let adapter = peft::load(&dir, m.llama.config(), m.llama.device()).unwrap();
        let want = reference(&fx[name]);
        let got = logits(&m, &tokens, &adapter.hook());
        assert!(
            max_abs_diff(&base, &want) > 0.05,
            "{name}: the fixture adapter changes the output"
        );
        // f32 sums in a different order: allow 1e-5 of the largest logit.
        let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
        let diff = max_abs_diff(&got, &want);
        assert!(
            diff < 1e-5 * scale,
            "{name}: max |tuneshop - PEFT| = {diff} (logits up to {scale})"
        );
    }
}
