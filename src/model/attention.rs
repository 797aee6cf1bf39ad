//! Attention of one sequence's new queries over its keys and values: the general path (candle
//! ops with a causal mask) and a fused CPU kernel for the one-token decode step, where a dozen
//! tiny tensor ops per layer would otherwise cost more than the arithmetic.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

/// Head layout of the model.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub q: usize,
    pub kv: usize,
    pub dim: usize,
}

/// `q`: `[q_heads, l, dim]`, `k`/`v`: `[kv_heads, t, dim]`, `mask`: additive `[l, t]`.
/// Returns `[q_heads, l, dim]`.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    h: Heads,
) -> Result<Tensor> {
    let l = q.dim(1)?;
    let group = h.q / h.kv;
    let scale = 1.0 / (h.dim as f64).sqrt();
    if l == 1 && q.device().is_cpu() && q.dtype() == DType::F32 {
        return q.contiguous()?.apply_op3_no_bwd(
            k,
            v,
            &DecodeAttention {
                group,
                scale: scale as f32,
            },
        );
    }
    let t = k.dim(1)?;
    // Heads sharing a key/value head are adjacent, so grouping them is a reshape.
    let qg = q.contiguous()?.reshape((h.kv, group * l, h.dim))?;
    let mut att = (qg.matmul(&k.t()?)? * scale)?;
    if let Some(mask) = mask {
        att = att
            .reshape((h.kv, group, l, t))?
            .broadcast_add(mask)?
            .reshape((h.kv, group * l, t))?;
    }
    let att = candle_nn::ops::softmax_last_dim(&att)?;
    att.matmul(v)?.reshape((h.q, l, h.dim))
}

/// One query per head against `t` cached keys: scores, softmax and the weighted sum of values
/// in one pass over strided cache views, without intermediate tensors.
struct DecodeAttention {
    group: usize,
    scale: f32,
}

fn f32_data<'a>(s: &'a CpuStorage, what: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("decode attention: {what} must be f32"),
    }
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "tuneshop-decode-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (f32_data(qs, "q")?, f32_data(ks, "k")?, f32_data(vs, "v")?);
        let (nh, one, dim) = ql.shape().dims3()?;
        let (nkv, t, kdim) = kl.shape().dims3()?;
        if one != 1 || kdim != dim || vl.shape().dims3()? != (nkv, t, dim) || nh != nkv * self.group
        {
            candle_core::bail!("decode attention: inconsistent shapes {ql:?} {kl:?} {vl:?}")
        }
        let Some((q0, _)) = ql.contiguous_offsets() else {
            candle_core::bail!("decode attention: q must be contiguous")
        };
        let (ks_, vs_) = (kl.stride(), vl.stride());
        if ks_[2] != 1 || vs_[2] != 1 {
            candle_core::bail!("decode attention: key and value rows must be contiguous")
        }
        let view = CacheView {
            k,
            v,
            k0: kl.start_offset(),
            v0: vl.start_offset(),
            k_strides: (ks_[0], ks_[1]),
            v_strides: (vs_[0], vs_[1]),
            t,
            dim,
            group: self.group,
            scale: self.scale,
        };
        let mut out = vec![0f32; nh * dim];
        view.attend(&q[q0..q0 + nh * dim], &mut out);
        Ok((CpuStorage::F32(out), Shape::from((nh, 1, dim))))
    }
}

/// Strided key/value views of one sequence's cache.
struct CacheView<'a> {
    k: &'a [f32],
    v: &'a [f32],
    k0: usize,
    v0: usize,
    k_strides: (usize, usize),
    v_strides: (usize, usize),
    t: usize,
    dim: usize,
    group: usize,
    scale: f32,
}

impl CacheView<'_> {
    /// `q`: `[heads, dim]` → `out`: `[heads, dim]`. Heads are independent: the compute threads
    /// (spinning between matmuls anyway) share them.
    fn attend(&self, q: &[f32], out: &mut [f32]) {
        let dim = self.dim;
        let kernel = head_kernel(dim);
        let dst = SendPtr(out.as_mut_ptr());
        candle_core::utils::barrier_pool().execute_chunked(q.len() / dim, |range| {
            let dst = &dst;
            let mut scores = vec![0f32; self.t];
            for head in range {
                // SAFETY: each head writes only its own `dim` outputs; `kernel` was chosen for
                // the features this CPU has.
                unsafe {
                    let o = std::slice::from_raw_parts_mut(dst.0.add(head * dim), dim);
                    kernel(
                        self,
                        &q[head * dim..(head + 1) * dim],
                        head / self.group,
                        &mut scores,
                        o,
                    );
                }
            }
        });
    }

    /// One head: scores against every cached key, softmax, weighted sum of values. `D` is the
    /// head dimension when known at compile time (the accumulator then lives in registers), or 0.
    #[inline(always)]
    fn attend_head<const D: usize, K: Dot>(
        &self,
        qv: &[f32],
        kvh: usize,
        scores: &mut [f32],
        o: &mut [f32],
    ) {
        let dim = if D == 0 { self.dim } else { D };
        let mut max = f32::NEG_INFINITY;
        for (j, s) in scores.iter_mut().enumerate() {
            let kr = self.k0 + kvh * self.k_strides.0 + j * self.k_strides.1;
            let k = &self.k[kr..kr + dim];
            *s = K::dot(qv, k) * self.scale;
            max = max.max(*s);
        }
        for s in scores.iter_mut() {
            *s = super::vmath::exp(*s - max);
        }
        let inv_total = 1.0 / scores.iter().sum::<f32>();
        if D == 0 {
            o.fill(0.0);
            for (j, &p) in scores.iter().enumerate() {
                let vr = self.v0 + kvh * self.v_strides.0 + j * self.v_strides.1;
                let w = p * inv_total;
                for (o, &x) in o.iter_mut().zip(&self.v[vr..vr + dim]) {
                    *o += w * x;
                }
            }
            return;
        }
        let mut acc = [0f32; D];
        for (j, &p) in scores.iter().enumerate() {
            let vr = self.v0 + kvh * self.v_strides.0 + j * self.v_strides.1;
            let v: &[f32; D] = self.v[vr..vr + D].try_into().expect("a value row");
            let w = p * inv_total;
            for i in 0..D {
                acc[i] += w * v[i];
            }
        }
        o.copy_from_slice(&acc);
    }
}

type HeadKernel = unsafe fn(&CacheView, &[f32], usize, &mut [f32], &mut [f32]);

/// The per-head attention compiled for the widest vector unit this CPU has (the crate itself
/// targets baseline x86-64, which would leave the loops on 128-bit SSE) and for the common head
/// sizes.
fn head_kernel(dim: usize) -> HeadKernel {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return match dim {
                64 => head_avx512::<64>,
                128 => head_avx512::<128>,
                _ => head_avx512::<0>,
            };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return match dim {
                64 => head_avx2::<64>,
                128 => head_avx2::<128>,
                _ => head_avx2::<0>,
            };
        }
    }
    match dim {
        64 => head_generic::<64>,
        128 => head_generic::<128>,
        _ => head_generic::<0>,
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn head_avx512<const D: usize>(
    c: &CacheView,
    q: &[f32],
    kvh: usize,
    scores: &mut [f32],
    o: &mut [f32],
) {
    c.attend_head::<D, Avx512>(q, kvh, scores, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn head_avx2<const D: usize>(
    c: &CacheView,
    q: &[f32],
    kvh: usize,
    scores: &mut [f32],
    o: &mut [f32],
) {
    c.attend_head::<D, Avx2>(q, kvh, scores, o)
}

unsafe fn head_generic<const D: usize>(
    c: &CacheView,
    q: &[f32],
    kvh: usize,
    scores: &mut [f32],
    o: &mut [f32],
) {
    c.attend_head::<D, Portable>(q, kvh, scores, o)
}

struct SendPtr(*mut f32);
// SAFETY: hands disjoint output ranges to the pool's threads (see `attend_generic`).
unsafe impl Sync for SendPtr {}

/// The dot product used for attention scores, per instruction set.
trait Dot {
    fn dot(a: &[f32], b: &[f32]) -> f32;
}

struct Portable;

impl Dot for Portable {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        dot(a, b)
    }
}

/// Only used inside `head_avx512`, which runs only where AVX-512F was detected.
#[cfg(target_arch = "x86_64")]
struct Avx512;

#[cfg(target_arch = "x86_64")]
impl Dot for Avx512 {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: see the type's comment.
        unsafe { dot_avx512(a, b) }
    }
}

/// Only used inside `head_avx2`, which runs only where AVX2 and FMA were detected.
#[cfg(target_arch = "x86_64")]
struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Dot for Avx2 {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: see the type's comment.
        unsafe { dot_avx2(a, b) }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    while i + 32 <= n {
        s0 = _mm512_fmadd_ps(
            _mm512_loadu_ps(a.as_ptr().add(i)),
            _mm512_loadu_ps(b.as_ptr().add(i)),
            s0,
        );
        s1 = _mm512_fmadd_ps(
            _mm512_loadu_ps(a.as_ptr().add(i + 16)),
            _mm512_loadu_ps(b.as_ptr().add(i + 16)),
            s1,
        );
        i += 32;
    }
    if i + 16 <= n {
        s0 = _mm512_fmadd_ps(
            _mm512_loadu_ps(a.as_ptr().add(i)),
            _mm512_loadu_ps(b.as_ptr().add(i)),
            s0,
        );
        i += 16;
    }
    let tail: f32 = a[i..n].iter().zip(&b[i..n]).map(|(x, y)| x * y).sum();
    _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)) + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= n {
        s0 = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.as_ptr().add(i)),
            _mm256_loadu_ps(b.as_ptr().add(i)),
            s0,
        );
        s1 = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.as_ptr().add(i + 8)),
            _mm256_loadu_ps(b.as_ptr().add(i + 8)),
            s1,
        );
        i += 16;
    }
    let s = _mm256_add_ps(s0, s1);
    let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    let tail: f32 = a[i..n].iter().zip(&b[i..n]).map(|(x, y)| x * y).sum();
    _mm_cvtss_f32(s) + tail
}

/// Dot product with 16 independent partial sums, so the compiler can vectorize it (a plain
/// sequential float sum cannot be reordered).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    // A pairwise tree, not a sequential sum: the compiler keeps it in vector registers.
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0] + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::max_abs_diff;
    use candle_core::Device;

    #[test]
    fn decode_kernel_matches_the_general_path() {
        for dim in [8, 64, 72] {
            decode_kernel_matches_for(Heads { q: 6, kv: 2, dim });
        }
    }

    fn decode_kernel_matches_for(h: Heads) {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (h.q, 1, h.dim), &dev).unwrap();
        // Strided views into a larger buffer, like the KV cache.
        let kb = Tensor::randn(0f32, 1.0, (h.kv, 16, h.dim), &dev).unwrap();
        let vb = Tensor::randn(0f32, 1.0, (h.kv, 16, h.dim), &dev).unwrap();
        let (k, v) = (kb.narrow(1, 0, 11).unwrap(), vb.narrow(1, 0, 11).unwrap());
        let fast = attend(&q, &k, &v, None, h).unwrap();
        // The general path, forced through a second query row.
        let q2 = Tensor::cat(&[&q, &q], 1).unwrap();
        let slow = attend(
            &q2,
            &k.contiguous().unwrap(),
            &v.contiguous().unwrap(),
            None,
            h,
        )
        .unwrap()
        .narrow(1, 0, 1)
        .unwrap();
        let diff = max_abs_diff(&fast, &slow);
        assert!(diff < 1e-5, "{diff}");
    }
}
