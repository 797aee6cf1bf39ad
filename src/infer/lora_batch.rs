//! Many adapters in one batch: each row of a forward pass applies its own LoRA update to the
//! shared frozen projections (the S-LoRA / Punica idea), without merging anything into the base
//! and without splitting the batch by adapter.
//!
//! A [`ServedAdapter`] is an adapter prepared for serving: immutable, with `scale` folded into
//! B, so a request can hold it (by `Arc`) while the cache evicts or the registry deletes it. On
//! the CPU one custom op per projection walks the rows and adds `B·(A·x)` for the rows that have
//! an adapter, reading each adapter's matrices in place (no per-step gathering or stacking).
//! Elsewhere (CUDA) the rows of each adapter are gathered and multiplied with candle ops.

use crate::lora::{Adapter, LoraError};
use crate::model::{LinearId, LoraHook, Proj};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use uuid::Uuid;

/// One adapted projection, ready to serve.
#[derive(Debug)]
struct Mats {
    rank: usize,
    in_dim: usize,
    out_dim: usize,
    /// `[r, in]`, row-major.
    a: Vec<f32>,
    /// `[out, r]`, row-major, already multiplied by the adapter's scale.
    b: Vec<f32>,
    /// The same matrices on a non-CPU device (`None` on the CPU).
    on_device: Option<(Tensor, Tensor)>,
}

/// An immutable, serving-ready adapter.
#[derive(Debug)]
pub struct ServedAdapter {
    /// The registry id (or a nil id for adapters loaded from a directory).
    pub id: Uuid,
    pub rank: usize,
    mats: BTreeMap<LinearId, Mats>,
    bytes: usize,
}

impl ServedAdapter {
    /// Prepares `adapter` for serving on `device`.
    pub fn new(
        id: Uuid,
        adapter: &Adapter,
        device: &Device,
    ) -> std::result::Result<Self, LoraError> {
        let scale = adapter.config.scale() as f32;
        let mut mats = BTreeMap::new();
        let mut bytes = 0;
        for (&lid, pair) in &adapter.pairs {
            let (rank, in_dim) = pair.a.dims2()?;
            let (out_dim, rb) = pair.b.dims2()?;
            if rb != rank {
                return Err(LoraError::Tensor {
                    key: crate::lora::peft::key(lid, 'B'),
                    detail: format!("rank {rb} differs from lora_A's {rank}"),
                });
            }
            let a: Vec<f32> = pair.a.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let b: Vec<f32> = pair
                .b
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(|v| v * scale)
                .collect();
            let on_device = match device {
                Device::Cpu => None,
                d => Some((
                    Tensor::from_slice(&a, (rank, in_dim), d)?,
                    Tensor::from_slice(&b, (out_dim, rank), d)?,
                )),
            };
            bytes += (a.len() + b.len()) * 4;
            mats.insert(
                lid,
                Mats {
                    rank,
                    in_dim,
                    out_dim,
                    a,
                    b,
                    on_device,
                },
            );
        }
        Ok(Self {
            id,
            rank: adapter.config.r,
            mats,
            bytes,
        })
    }

    /// Bytes of matrices held.
    pub fn size_in_bytes(&self) -> usize {
        self.bytes
    }

    /// The projections this adapter changes.
    pub fn targets(&self) -> impl Iterator<Item = Proj> + '_ {
        let mut seen: Vec<Proj> = self.mats.keys().map(|id| id.proj).collect();
        seen.sort();
        seen.dedup();
        seen.into_iter()
    }
}

/// Which adapter each row of a forward pass uses.
pub struct BatchLora<'a> {
    rows: Vec<Option<&'a ServedAdapter>>,
}

impl<'a> BatchLora<'a> {
    /// `rows[i]` is the adapter of row `i` (`None`: the base model alone).
    pub fn new(rows: Vec<Option<&'a ServedAdapter>>) -> Self {
        Self { rows }
    }

    fn any(&self) -> bool {
        self.rows.iter().any(Option::is_some)
    }
}

impl LoraHook for BatchLora<'_> {
    fn apply(&self, id: LinearId, xs: &Tensor, ys: Tensor) -> Result<Tensor> {
        // Rows without an adapter pay nothing; a batch without any pays nothing at all.
        if !self.any() {
            return Ok(ys);
        }
        let rows: Vec<Option<&Mats>> = self
            .rows
            .iter()
            .map(|a| a.and_then(|a| a.mats.get(&id)))
            .collect();
        if rows.iter().all(Option::is_none) {
            return Ok(ys);
        }
        if xs.dim(0)? != rows.len() {
            candle_core::bail!(
                "the batch has {} rows but {} row adapters",
                xs.dim(0)?,
                rows.len()
            )
        }
        let delta = if xs.device().is_cpu() {
            xs.to_dtype(DType::F32)?
                .contiguous()?
                .apply_op1_no_bwd(&RowLoraDelta { rows: &rows })?
        } else {
            gathered_delta(xs, &rows, ys.dim(1)?)?
        };
        let dtype = ys.dtype();
        ys + delta.to_dtype(dtype)?
    }
}

/// `delta[i] = B_i · (A_i · x[i])` for the rows with an adapter, zero for the others.
struct RowLoraDelta<'a, 'm> {
    rows: &'a [Option<&'m Mats>],
}

/// Rows handled by one task in a prefill-sized batch.
const ROWS_PER_TASK: usize = 16;

impl CustomOp1 for RowLoraDelta<'_, '_> {
    fn name(&self) -> &'static str {
        "tuneshop-row-lora-delta"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("row lora delta: the input must be f32")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("row lora delta: the input must be contiguous")
        };
        let (n, in_dim) = layout.shape().dims2()?;
        let xs = &data[start..end];
        let Some(first) = self.rows.iter().flatten().next() else {
            candle_core::bail!("row lora delta: no row has an adapter")
        };
        let out_dim = first.out_dim;
        if let Some(m) = self
            .rows
            .iter()
            .flatten()
            .find(|m| m.in_dim != in_dim || m.out_dim != out_dim)
        {
            candle_core::bail!(
                "row lora delta: adapter matrix [{}, {}] does not fit the projection [{out_dim}, {in_dim}]",
                m.out_dim,
                m.in_dim
            )
        }
        let mut out = vec![0f32; n * out_dim];
        let work = |(chunk, out): (usize, &mut [f32])| {
            let mut t = Vec::new();
            for (k, o) in out.chunks_exact_mut(out_dim).enumerate() {
                let row = chunk * ROWS_PER_TASK + k;
                if let Some(m) = self.rows[row] {
                    add_row_delta(m, &xs[row * in_dim..(row + 1) * in_dim], &mut t, o);
                }
            }
        };
        // Decode batches are a few rows: threads would cost more than the work.
        if n > ROWS_PER_TASK {
            out.par_chunks_mut(ROWS_PER_TASK * out_dim)
                .enumerate()
                .for_each(work);
        } else {
            out.chunks_mut(ROWS_PER_TASK * out_dim)
                .enumerate()
                .for_each(work);
        }
        Ok((CpuStorage::F32(out), Shape::from((n, out_dim))))
    }
}

/// `o += B · (A · x)` for one row; `t` is scratch for the rank-sized middle.
fn add_row_delta(m: &Mats, x: &[f32], t: &mut Vec<f32>, o: &mut [f32]) {
    t.clear();
    t.extend(m.a.chunks_exact(m.in_dim).map(|a_row| dot(a_row, x)));
    for (o, b_row) in o.iter_mut().zip(m.b.chunks_exact(m.rank)) {
        *o += dot(b_row, t);
    }
}

/// A dot product written so that the compiler vectorizes it (eight independent sums).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// The device path: rows grouped by adapter, gathered, multiplied, scattered back.
fn gathered_delta(xs: &Tensor, rows: &[Option<&Mats>], out_dim: usize) -> Result<Tensor> {
    let dev = xs.device();
    let xs = xs.to_dtype(DType::F32)?;
    let mut delta = Tensor::zeros((rows.len(), out_dim), DType::F32, dev)?;
    let mut groups: Vec<(&Mats, Vec<u32>)> = Vec::new();
    for (i, m) in rows.iter().enumerate() {
        let Some(m) = m else { continue };
        match groups.iter_mut().find(|(g, _)| std::ptr::eq(*g, *m)) {
            Some((_, idx)) => idx.push(i as u32),
            None => groups.push((m, vec![i as u32])),
        }
    }
    for (m, idx) in groups {
        let (a, b) = match &m.on_device {
            Some((a, b)) => (a.clone(), b.clone()),
            None => (
                Tensor::from_slice(&m.a, (m.rank, m.in_dim), dev)?,
                Tensor::from_slice(&m.b, (m.out_dim, m.rank), dev)?,
            ),
        };
        let idx = Tensor::new(idx.as_slice(), dev)?;
        let x = xs.index_select(&idx, 0)?;
        let d = x.matmul(&a.t()?)?.matmul(&b.t()?)?;
        delta = delta.index_add(&idx, &d, 0)?;
    }
    Ok(delta)
}

/// Serving-ready adapters shared by requests.
pub type AdapterLease = Arc<ServedAdapter>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::{LoraConfig, LoraPair};

    fn random_adapter(seed: u64, rank: usize) -> Adapter {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut v =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-0.5..0.5)).collect() };
        let mut pairs = BTreeMap::new();
        for proj in [Proj::Q, Proj::V] {
            let id = LinearId { layer: 0, proj };
            let a = Tensor::from_vec(v(rank * 24), (rank, 24), &Device::Cpu).unwrap();
            let b = Tensor::from_vec(v(16 * rank), (16, rank), &Device::Cpu).unwrap();
            pairs.insert(id, LoraPair { a, b });
        }
        Adapter {
            config: LoraConfig {
                r: rank,
                alpha: 2.0 * rank as f64,
                targets: vec![Proj::Q, Proj::V],
                ..LoraConfig::default()
            },
            base_model: "test".into(),
            pairs,
        }
    }

    #[test]
    fn per_row_updates_match_each_adapter_alone_on_both_paths() {
        let (x, y) = (random_adapter(1, 4), random_adapter(2, 8));
        let sx = ServedAdapter::new(Uuid::nil(), &x, &Device::Cpu).unwrap();
        let sy = ServedAdapter::new(Uuid::nil(), &y, &Device::Cpu).unwrap();
        let id = LinearId {
            layer: 0,
            proj: Proj::Q,
        };
        let n = 40; // more than one task's rows, so the threaded path runs too
        let xs = Tensor::randn(0f32, 1.0, (n, 24), &Device::Cpu).unwrap();
        let ys = Tensor::randn(0f32, 1.0, (n, 16), &Device::Cpu).unwrap();
        let pick = |i: usize| match i % 3 {
            0 => Some(&sx),
            1 => Some(&sy),
            _ => None,
        };
        let hook = BatchLora::new((0..n).map(pick).collect());
        let got = hook.apply(id, &xs, ys.clone()).unwrap();
        let rows: Vec<Option<&Mats>> = (0..n).map(|i| pick(i).map(|a| &a.mats[&id])).collect();
        let gathered = (ys.clone() + gathered_delta(&xs, &rows, 16).unwrap()).unwrap();
        for i in 0..n {
            let want = match i % 3 {
                0 => x.hook().apply(
                    id,
                    &xs.narrow(0, i, 1).unwrap(),
                    ys.narrow(0, i, 1).unwrap(),
                ),
                1 => y.hook().apply(
                    id,
                    &xs.narrow(0, i, 1).unwrap(),
                    ys.narrow(0, i, 1).unwrap(),
                ),
                _ => Ok(ys.narrow(0, i, 1).unwrap()),
            }
            .unwrap();
            let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            for t in [&got, &gathered] {
                let row: Vec<f32> = t
                    .narrow(0, i, 1)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let diff = row
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(diff < 1e-4, "row {i}: {diff}");
            }
        }
        // A projection no row adapts, and a batch without adapters, are left untouched.
        let down = LinearId {
            layer: 0,
            proj: Proj::Down,
        };
        let same = hook.apply(down, &xs, ys.clone()).unwrap();
        assert_eq!(same.to_vec2::<f32>().unwrap(), ys.to_vec2::<f32>().unwrap());
        let none = BatchLora::new(vec![None; n])
            .apply(id, &xs, ys.clone())
            .unwrap();
        assert_eq!(none.to_vec2::<f32>().unwrap(), ys.to_vec2::<f32>().unwrap());
    }
}
