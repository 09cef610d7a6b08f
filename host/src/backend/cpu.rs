//! The CPU backend: the reference implementation of every kernel.
//!
//! Plain safe Rust. The matmul inner product keeps eight independent partial
//! sums so the compiler can vectorise it without reassociating a single sum;
//! large matmuls split rows of the output across threads. The quantised,
//! SIMD-tuned kernels for real models arrive with the model issue.

use super::{Backend, BackendError, BinaryOp, DeviceBuffer};

/// Below this many multiply-adds a matmul stays on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 20;

/// The CPU backend.
#[derive(Debug, Clone)]
pub struct CpuBackend {
    threads: usize,
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

fn host(buf: &DeviceBuffer) -> Result<&[f32], BackendError> {
    match buf {
        DeviceBuffer::Host(v) => Ok(v),
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, ra) = a.as_chunks::<8>();
    let (cb, rb) = b.as_chunks::<8>();
    for (x, y) in ca.iter().zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

fn matmul_rows(x: &[f32], w: &[f32], k: usize, n: usize, out: &mut [f32]) {
    for (xr, or) in x.chunks_exact(k).zip(out.chunks_exact_mut(n)) {
        for (o, wr) in or.iter_mut().zip(w.chunks_exact(k)) {
            *o = dot(xr, wr);
        }
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn zeros(&self, len: usize) -> Result<DeviceBuffer, BackendError> {
        Ok(DeviceBuffer::Host(vec![0.0; len]))
    }

    fn upload(&self, data: &[f32]) -> Result<DeviceBuffer, BackendError> {
        Ok(DeviceBuffer::Host(data.to_vec()))
    }

    fn download(&self, buf: &DeviceBuffer) -> Result<Vec<f32>, BackendError> {
        Ok(host(buf)?.to_vec())
    }

    fn matmul(
        &self,
        x: &DeviceBuffer,
        w: &DeviceBuffer,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<DeviceBuffer, BackendError> {
        let (x, w) = (host(x)?, host(w)?);
        let mut out = vec![0f32; m * n];
        let threads = self.threads.min(m);
        if threads <= 1 || m * n * k < PARALLEL_MIN_WORK {
            matmul_rows(x, w, k, n, &mut out);
        } else {
            let rows_per = m.div_ceil(threads);
            std::thread::scope(|s| {
                for (xc, oc) in x.chunks(rows_per * k).zip(out.chunks_mut(rows_per * n)) {
                    s.spawn(move || matmul_rows(xc, w, k, n, oc));
                }
            });
        }
        Ok(DeviceBuffer::Host(out))
    }

    fn binary(
        &self,
        op: BinaryOp,
        a: &DeviceBuffer,
        b: &DeviceBuffer,
        cols: usize,
    ) -> Result<DeviceBuffer, BackendError> {
        let (a, b) = (host(a)?, host(b)?);
        let f = match op {
            BinaryOp::Add => |x: f32, y: f32| x + y,
            BinaryOp::Mul => |x: f32, y: f32| x * y,
        };
        let out = if a.len() == b.len() {
            a.iter().zip(b).map(|(x, y)| f(*x, *y)).collect()
        } else {
            a.chunks_exact(cols)
                .flat_map(|row| row.iter().zip(b).map(|(x, y)| f(*x, *y)))
                .collect()
        };
        Ok(DeviceBuffer::Host(out))
    }

    fn rmsnorm(
        &self,
        x: &DeviceBuffer,
        w: &DeviceBuffer,
        cols: usize,
        eps: f32,
    ) -> Result<DeviceBuffer, BackendError> {
        let (x, w) = (host(x)?, host(w)?);
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks_exact(cols) {
            let mean_sq = dot(row, row) / cols as f32;
            let scale = 1.0 / (mean_sq + eps).sqrt();
            out.extend(row.iter().zip(w).map(|(v, g)| v * scale * g));
        }
        Ok(DeviceBuffer::Host(out))
    }

    fn softmax(&self, x: &DeviceBuffer, cols: usize) -> Result<DeviceBuffer, BackendError> {
        let x = host(x)?;
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks_exact(cols) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let start = out.len();
            let mut sum = 0.0;
            for v in row {
                let e = (v - max).exp();
                sum += e;
                out.push(e);
            }
            let inv = 1.0 / sum;
            for v in &mut out[start..] {
                *v *= inv;
            }
        }
        Ok(DeviceBuffer::Host(out))
    }

    fn silu(&self, x: &DeviceBuffer) -> Result<DeviceBuffer, BackendError> {
        let x = host(x)?;
        Ok(DeviceBuffer::Host(
            x.iter().map(|v| v / (1.0 + (-v).exp())).collect(),
        ))
    }

    fn rope(
        &self,
        x: &DeviceBuffer,
        heads: usize,
        head_dim: usize,
        pos: u32,
        theta: f32,
    ) -> Result<DeviceBuffer, BackendError> {
        let x = host(x)?;
        let mut out = x.to_vec();
        let half = head_dim / 2;
        // Frequencies per pair, shared by every row and head.
        let freqs: Vec<f64> = (0..half)
            .map(|i| f64::from(theta).powf(-2.0 * i as f64 / head_dim as f64))
            .collect();
        for (s, row) in out.chunks_exact_mut(heads * head_dim).enumerate() {
            let p = f64::from(pos) + s as f64;
            let rot: Vec<(f32, f32)> = freqs
                .iter()
                .map(|f| {
                    let a = p * f;
                    (a.cos() as f32, a.sin() as f32)
                })
                .collect();
            for head in row.chunks_exact_mut(head_dim) {
                for (pair, (c, sn)) in head.chunks_exact_mut(2).zip(&rot) {
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * c - b * sn;
                    pair[1] = a * sn + b * c;
                }
            }
        }
        Ok(DeviceBuffer::Host(out))
    }

    fn argmax(&self, x: &DeviceBuffer, cols: usize) -> Result<Vec<u32>, BackendError> {
        let x = host(x)?;
        Ok(x.chunks_exact(cols)
            .map(|row| {
                let mut best = 0usize;
                let mut best_v = f32::NEG_INFINITY;
                for (i, v) in row.iter().enumerate() {
                    if *v > best_v {
                        best = i;
                        best_v = *v;
                    }
                }
                best as u32 // cols fits u32: shapes are lists of u32
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(v: &[f32]) -> DeviceBuffer {
        DeviceBuffer::Host(v.to_vec())
    }
    fn get(b: DeviceBuffer) -> Vec<f32> {
        match b {
            DeviceBuffer::Host(v) => v,
        }
    }
    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "at {i}: {x} vs {y}");
        }
    }

    #[test]
    fn matmul_matches_naive_sum_serial_and_parallel() {
        let cpu = CpuBackend::default();
        for &(m, k, n) in &[(1, 3, 2), (3, 17, 5), (64, 130, 200)] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0)
                .collect();
            let mut want = vec![0f32; m * n];
            for i in 0..m {
                for j in 0..n {
                    want[i * n + j] = (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum();
                }
            }
            let got = get(cpu.matmul(&buf(&x), &buf(&w), m, k, n).expect("matmul"));
            close(&got, &want, 1e-4);
        }
    }

    #[test]
    fn elementwise_and_broadcast() {
        let cpu = CpuBackend::default();
        let a = buf(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(
            get(cpu
                .binary(BinaryOp::Add, &a, &buf(&[10.0, 20.0]), 2)
                .expect("add")),
            [11.0, 22.0, 13.0, 24.0]
        );
        assert_eq!(
            get(cpu.binary(BinaryOp::Mul, &a, &a, 2).expect("mul")),
            [1.0, 4.0, 9.0, 16.0]
        );
        let s = get(cpu.silu(&buf(&[0.0, 1.0])).expect("silu"));
        close(&s, &[0.0, 0.731_058_6], 1e-6);
    }

    #[test]
    fn rmsnorm_softmax_argmax() {
        let cpu = CpuBackend::default();
        let r = get(cpu
            .rmsnorm(&buf(&[3.0, 4.0]), &buf(&[1.0, 2.0]), 2, 0.0)
            .expect("rmsnorm"));
        let rms = (12.5f32).sqrt();
        close(&r, &[3.0 / rms, 8.0 / rms], 1e-6);
        let sm = get(cpu
            .softmax(&buf(&[1000.0, 1000.0, 0.0, f32::NEG_INFINITY]), 2)
            .expect("softmax"));
        close(&sm, &[0.5, 0.5, 1.0, 0.0], 1e-6);
        assert_eq!(
            cpu.argmax(&buf(&[1.0, 3.0, 3.0, f32::NAN, -1.0, -2.0]), 3)
                .expect("argmax"),
            [1, 1]
        );
    }

    #[test]
    fn rope_rotates_adjacent_pairs() {
        let cpu = CpuBackend::default();
        // One row, one head, head_dim 4: pair 0 rotates by pos, pair 1 by pos / theta^(1/2).
        let out = get(cpu
            .rope(&buf(&[1.0, 0.0, 1.0, 0.0]), 1, 4, 2, 100.0)
            .expect("rope"));
        close(
            &out,
            &[2f32.cos(), 2f32.sin(), 0.2f32.cos(), 0.2f32.sin()],
            1e-6,
        );
        // Position 0 is the identity.
        let x = [0.3, -0.7, 1.5, 2.0];
        close(
            &get(cpu.rope(&buf(&x), 1, 4, 0, 10000.0).expect("rope")),
            &x,
            0.0,
        );
    }
}
