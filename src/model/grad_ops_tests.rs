//! Gradient checks of the custom ops against finite differences and composed candle ops.

use super::*;
use crate::model::quant::{QMatrix, QType};
use crate::model::test_util::max_abs_diff;
use candle_core::Var;

/// Checks the gradient of `sum(f(x) * probe)` with respect to `x` by central differences.
fn check_grad(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>, tol: f32) {
    let var = Var::from_tensor(
        &x.to_dtype(DType::F64)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap(),
    )
    .unwrap();
    let y = f(var.as_tensor()).unwrap();
    let probe = Tensor::randn(0f32, 1.0, y.shape(), &Device::Cpu).unwrap();
    let loss = (y * &probe).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let g = grads
        .get(var.as_tensor())
        .expect("a gradient")
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let base = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let eps = 1e-2f32;
    for i in (0..base.len()).step_by((base.len() / 13).max(1)) {
        let eval = |delta: f32| {
            let mut v = base.clone();
            v[i] += delta;
            let t = Tensor::from_vec(v, x.shape(), &Device::Cpu).unwrap();
            (f(&t).unwrap() * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
        assert!(
            (numeric - g[i]).abs() < tol * (1.0 + numeric.abs()),
            "index {i}: numeric {numeric}, analytic {}",
            g[i]
        );
    }
}

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
}

#[test]
fn frozen_linear_gradients() {
    let w = Weight::Dense(randn(&[7, 6]));
    let q = Weight::Quantized(Arc::new(QMatrix::quantize(
        QType::Q8_0,
        5,
        32,
        &randn(&[5 * 32]).to_vec1().unwrap(),
    )));
    check_grad(
        &randn(&[3, 6]),
        |x| frozen_matmul_t(&[&w, &w], x, ComputeDtype::F32).and_then(|v| Tensor::cat(&v, 1)),
        2e-2,
    );
    check_grad(
        &randn(&[4, 32]),
        |x| frozen_matmul_t(&[&q], x, ComputeDtype::F32).map(|mut v| v.remove(0)),
        2e-2,
    );
}

/// Output and input gradient of a grouped frozen linear (dense and quantized weights).
fn frozen_linear_with(
    dtype: ComputeDtype,
    x: &Tensor,
    probe: &Tensor,
    ws: &[&Weight],
) -> (Vec<f32>, Vec<f32>) {
    let var = Var::from_tensor(x).unwrap();
    let y = Tensor::cat(&frozen_matmul_t(ws, var.as_tensor(), dtype).unwrap(), 1).unwrap();
    let grads = (&y * probe).unwrap().sum_all().unwrap().backward().unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (
        flat(&y),
        flat(grads.get(var.as_tensor()).expect("a gradient")),
    )
}

#[test]
fn bf16_frozen_linear_agrees_with_f32() {
    if !crate::model::bf16_gemm::available() {
        eprintln!("skipped: this CPU has no AVX512-BF16");
        return;
    }
    let q = Weight::Quantized(Arc::new(QMatrix::quantize(
        QType::Q4_1,
        50,
        64,
        &randn(&[50 * 64]).to_vec1().unwrap(),
    )));
    let d = Weight::Dense(randn(&[30, 64]));
    let x = randn(&[37, 64]);
    let probe = randn(&[37, 80]);
    let (y32, g32) = frozen_linear_with(ComputeDtype::F32, &x, &probe, &[&q, &d]);
    let (y16, g16) = frozen_linear_with(ComputeDtype::Bf16, &x, &probe, &[&q, &d]);
    // bf16 keeps 8 significant bits: each product is off by under 2⁻⁸ relative, and sums of
    // 64 terms of random sign stay well inside this bound.
    for (what, a, b) in [("output", &y32, &y16), ("input gradient", &g32, &g16)] {
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = a
            .iter()
            .zip(b.iter())
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst < 0.02 * scale,
            "{what}: differs by {worst} (scale {scale})"
        );
        assert!(
            a != b,
            "{what}: bf16 gave exactly the f32 result, so it did not run"
        );
    }
}

#[test]
fn rms_norm_gradient_and_value() {
    let w = (randn(&[8]) * 0.1).unwrap().affine(1.0, 1.0).unwrap();
    let x = randn(&[3, 8]);
    let fast = rms_norm(&x, &w, 1e-5).unwrap();
    let want = candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap();
    let diff = max_abs_diff(&fast, &want);
    assert!(diff < 1e-5);
    check_grad(&x, |x| rms_norm(x, &w, 1e-5), 2e-2);
}

#[test]
fn rope_gradient_and_value() {
    let (rows, heads, dim) = (4, 2, 8);
    let angles: Vec<f32> = (0..rows * dim / 2).map(|i| i as f32 * 0.37).collect();
    let cos = Tensor::from_vec(
        angles.iter().map(|a| a.cos()).collect::<Vec<_>>(),
        (rows, dim / 2),
        &Device::Cpu,
    )
    .unwrap();
    let sin = Tensor::from_vec(
        angles.iter().map(|a| a.sin()).collect::<Vec<_>>(),
        (rows, dim / 2),
        &Device::Cpu,
    )
    .unwrap();
    let x = randn(&[rows, heads, dim]);
    let fast = rope(&x, &cos, &sin).unwrap();
    let want = candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0).unwrap(), &cos, &sin)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let diff = max_abs_diff(&fast, &want);
    assert!(diff < 1e-5);
    check_grad(&x, |x| rope(x, &cos, &sin), 2e-2);
}

#[test]
fn attention_gradients_and_value() {
    let heads = Heads {
        q: 4,
        kv: 2,
        dim: 8,
    };
    let (q, k, v) = (randn(&[4, 5, 8]), randn(&[2, 5, 8]), randn(&[2, 5, 8]));
    let fused = causal_attention(&q, &k, &v, heads).unwrap();
    let mask: Vec<f32> = (0..5)
        .flat_map(|i| (0..5).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, (5, 5), &Device::Cpu).unwrap();
    let want = super::super::attention::attend(&q, &k, &v, Some(&mask), heads).unwrap();
    let diff = max_abs_diff(&fused, &want);
    assert!(diff < 1e-5);
    check_grad(&q, |q| causal_attention(q, &k, &v, heads), 2e-2);
    check_grad(&k, |k| causal_attention(&q, k, &v, heads), 2e-2);
    check_grad(&v, |v| causal_attention(&q, &k, v, heads), 2e-2);
}
