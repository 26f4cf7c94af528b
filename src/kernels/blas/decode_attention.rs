//! Attention of a few query rows over a long KV cache (a decoding step): split over blocks of
//! keys, each block's partial softmax merged by its log-sum-exp (flash-decoding), so both cores
//! share one query row's keys and each key/value row is read from memory once for all the query
//! heads that share it. Keys and values are f32 or f16 (the half KV cache, the CPU default).
//! Where the CPU has AVX2 + FMA + F16C and the head size is a multiple of 64, the split-key
//! kernels of [`avx2`] read either storage in registers (f16 widened there), reduce eight keys'
//! dot products together and keep each output row in registers across the block. Elsewhere the
//! portable kernel (vectorised dots and exponentials, compiled for AVX-512 or AVX2+FMA and
//! chosen at run time) runs on f32 rows, an f16 block widened first into a per-thread buffer.

#[cfg(target_arch = "x86_64")]
mod avx2;

use std::cell::RefCell;

use half::{f16, slice::HalfFloatSliceExt};

use super::softmax::{exp_sum, max_of, simd_dispatch};

/// Keys per parallel task.
const KEY_BLOCK: usize = 256;

/// Where one batch row's keys and values of one KV head start, and their row strides.
pub(super) struct KvHead {
    pub k0: usize,
    pub ldk: usize,
    pub v0: usize,
    pub ldv: usize,
}

/// The shapes of one call: `q` `(b, h, t, hd)` contiguous, output `(b, t, h, hd)`; query row
/// `r` sees keys `0 ..= past + r`.
pub(super) struct Dims {
    pub b: usize,
    pub h: usize,
    pub nkv: usize,
    pub t: usize,
    pub hd: usize,
    pub len: usize,
}

/// One task's softmax over its keys, before normalisation: per query row the running max `m`,
/// the sum `l` of `exp(s - m)`, and `o = sum exp(s - m) v`.
struct Partial {
    m: Vec<f32>,
    l: Vec<f32>,
    o: Vec<f32>,
}

/// Tests and benchmarks: `REFRAG_ATTN=portable` keeps the AVX2 kernels off.
fn portable_only() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var("REFRAG_ATTN").as_deref() == Ok("portable"))
}

/// Keys and values as the cache stores them: both in one storage type.
#[derive(Clone, Copy)]
pub(super) enum Kv<'a> {
    F32 { k: &'a [f32], v: &'a [f32] },
    F16 { k: &'a [f16], v: &'a [f16] },
}

thread_local! {
    /// Per thread: a task's key and value rows widened from f16.
    static WIDE: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Rows `j0..j1` (stride `ld`, from `at`) of `hd` halves, widened into `dst` contiguously.
fn widen(src: &[f16], at: usize, ld: usize, j0: usize, j1: usize, hd: usize, dst: &mut Vec<f32>) {
    dst.resize((j1 - j0) * hd, 0.0);
    for (j, row) in (j0..j1).zip(dst.chunks_exact_mut(hd)) {
        src[at + j * ld..][..hd].convert_to_f32_slice(row);
    }
}

/// [`attend_block`] over keys and values in either storage: the AVX2 kernels where the CPU
/// and head size allow (f16 read in registers), else the portable kernel (f16 rows widened
/// into a per-thread buffer first).
fn attend_any(
    q: &[f32],
    seen: &[usize],
    kv_data: Kv<'_>,
    kv: &KvHead,
    (j0, j1): (usize, usize),
    hd: usize,
) -> Partial {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() && avx2::fits(hd) && !portable_only() {
        // SAFETY: the CPU has the kernels' features and `hd` fits; the rows are in range (the
        // kernels assert it).
        return match kv_data {
            Kv::F32 { k, v } => unsafe { avx2::attend_f32(q, seen, k, v, kv, (j0, j1), hd) },
            Kv::F16 { k, v } => unsafe { avx2::attend_f16(q, seen, k, v, kv, (j0, j1), hd) },
        };
    }
    match kv_data {
        Kv::F32 { k, v } => attend_block(&Job {
            q,
            seen,
            k,
            v,
            kv,
            j0,
            j1,
            hd,
        }),
        Kv::F16 { k, v } => WIDE.with(|w| {
            let (wk, wv) = &mut *w.borrow_mut();
            let n = j1 - j0;
            widen(k, kv.k0, kv.ldk, j0, j1, hd, wk);
            widen(v, kv.v0, kv.ldv, j0, j1, hd, wv);
            // The widened block: its rows are keys j0.. at stride hd, from 0.
            let local = KvHead {
                k0: 0,
                ldk: hd,
                v0: 0,
                ldv: hd,
            };
            let shifted: Vec<usize> = seen.iter().map(|&s| s.saturating_sub(j0)).collect();
            attend_block(&Job {
                q,
                seen: &shifted,
                k: &wk[..n * hd],
                v: &wv[..n * hd],
                kv: &local,
                j0: 0,
                j1: n,
                hd,
            })
        }),
    }
}

/// A task: the `rows` query rows of one KV head (pre-scaled, `rows x hd`) over keys `j0..j1`.
struct Job<'a> {
    q: &'a [f32],
    seen: &'a [usize],
    k: &'a [f32],
    v: &'a [f32],
    kv: &'a KvHead,
    j0: usize,
    j1: usize,
    hd: usize,
}

simd_dispatch! {
    fn attend_block(job: &Job<'_>) -> Partial = attend_block_generic
}

const LANES: usize = 16;

/// An f32 dot product in independent lane sums (so the compiler vectorises it).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn attend_block_generic(job: &Job<'_>) -> Partial {
    let (hd, n) = (job.hd, job.j1 - job.j0);
    let rows = job.seen.len();
    let mut s = vec![0f32; rows * n];
    for j in job.j0..job.j1 {
        let kj = &job.k[job.kv.k0 + j * job.kv.ldk..][..hd];
        for r in 0..rows {
            if j < job.seen[r] {
                s[r * n + j - job.j0] = dot(&job.q[r * hd..(r + 1) * hd], kj);
            }
        }
    }
    let mut p = Partial {
        m: vec![f32::NEG_INFINITY; rows],
        l: vec![0f32; rows],
        o: vec![0f32; rows * hd],
    };
    for r in 0..rows {
        let live = job.seen[r].clamp(job.j0, job.j1) - job.j0;
        if live == 0 {
            continue;
        }
        let row = &mut s[r * n..r * n + live];
        let m = max_of(row);
        let l = exp_sum(row, m);
        let o = &mut p.o[r * hd..(r + 1) * hd];
        for (i, &w) in row.iter().enumerate() {
            let vj = &job.v[job.kv.v0 + (job.j0 + i) * job.kv.ldv..][..hd];
            for (a, b) in o.iter_mut().zip(vj) {
                *a += w * b;
            }
        }
        p.m[r] = m;
        p.l[r] = l;
    }
    p
}

/// Attention of `d.t` query rows (few: a decoding step) over `d.len` keys, written into `out`
/// `(b, t, h, hd)`. `kv[bi * nkv + g]` locates batch row `bi`'s KV head `g` in `k` / `v`.
pub(super) fn few_rows(
    q: &[f32],
    kv_data: Kv<'_>,
    kv: &[KvHead],
    d: &Dims,
    scale: f32,
    out: &mut [f32],
) {
    let Dims {
        b,
        h,
        nkv,
        t,
        hd,
        len,
    } = *d;
    let (rep, past) = (h / nkv, len - t);
    let blocks = len.div_ceil(KEY_BLOCK);
    // Each KV head's query rows (its `rep` query heads x `t` steps), scaled, and what they see.
    let seen: Vec<usize> = (0..rep)
        .flat_map(|_| (0..t).map(|r| past + r + 1))
        .collect();
    let heads: Vec<(usize, usize, Vec<f32>, &KvHead)> = (0..b)
        .flat_map(|bi| (0..nkv).map(move |g| (bi, g)))
        .map(|(bi, g)| {
            let mut rows = Vec::with_capacity(rep * t * hd);
            for hh in g * rep..(g + 1) * rep {
                let at = (bi * h + hh) * t * hd;
                rows.extend(q[at..at + t * hd].iter().map(|x| x * scale));
            }
            (bi, g, rows, &kv[bi * nkv + g])
        })
        .collect();
    let partials: Vec<Partial> = crate::kernels::team::map(heads.len() * blocks, |task| {
        let (_, _, rows, kvh) = &heads[task / blocks];
        let j0 = (task % blocks) * KEY_BLOCK;
        attend_any(
            rows,
            &seen,
            kv_data,
            kvh,
            (j0, (j0 + KEY_BLOCK).min(len)),
            hd,
        )
    });
    for (hi, (bi, g, _, _)) in heads.iter().enumerate() {
        let parts = &partials[hi * blocks..(hi + 1) * blocks];
        for (r, &sees) in seen.iter().enumerate() {
            let (hh, step) = (g * rep + r / t, r % t);
            let dst = &mut out[((bi * t + step) * h + hh) * hd..][..hd];
            dst.fill(0.0);
            let m = parts
                .iter()
                .map(|p| p.m[r])
                .fold(f32::NEG_INFINITY, f32::max);
            debug_assert!(sees > 0 && m.is_finite());
            let mut l = 0f32;
            for p in parts.iter().filter(|p| p.l[r] > 0.0) {
                let w = (p.m[r] - m).exp();
                l += w * p.l[r];
                for (a, b) in dst.iter_mut().zip(&p.o[r * hd..(r + 1) * hd]) {
                    *a += w * b;
                }
            }
            let inv = 1.0 / l;
            dst.iter_mut().for_each(|x| *x *= inv);
        }
    }
}
