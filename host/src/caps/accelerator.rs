//! `cinfer:loader/accelerator`: tensors in accelerator memory and the op set.
//!
//! Every launch is validated here, once for all backends: handles, ranks,
//! shapes, dtypes, argument ranges, the accelerator memory budget and a cap on
//! the work of one launch (host calls are not interrupted by the epoch
//! deadline, so one launch must stay short). A bad launch is a guest-visible
//! [`AccelError`], never a host panic.

use super::PolicyViolation;
use crate::backend::{Backend, BackendError, BinaryOp, DeviceBuffer};
pub use crate::bindings::accelerator::{AccelError, Dtype};
use crate::bindings::accelerator::{Host, HostTensor};
use std::sync::Arc;
use wasmtime::component::{Resource, ResourceTable};

/// Largest tensor rank.
pub const MAX_RANK: usize = 4;
/// Most multiply-adds one matmul launch may do (about 1–3 s on one CPU core).
pub const MAX_MATMUL_WORK: u64 = 1 << 33;
/// Most live tensors per run.
pub const MAX_TENSORS: usize = 1 << 16;

/// A tensor: shape, element type and device memory.
#[derive(Debug)]
pub struct Tensor {
    shape: Vec<u32>,
    dtype: Dtype,
    buf: DeviceBuffer,
    bytes: u64,
    downloadable: bool,
}

/// The accelerator state of one run.
#[derive(Debug)]
pub struct AccelCtx {
    backend: Arc<dyn Backend>,
    table: ResourceTable,
    live: usize,
    in_use: u64,
    limit: u64,
    launches: u64,
}

fn dtype_size(_: Dtype) -> u64 {
    4
}

/// Validates a shape and returns its element count.
fn numel(shape: &[u32]) -> Result<usize, AccelError> {
    if shape.is_empty() || shape.len() > MAX_RANK || shape.contains(&0) {
        return Err(AccelError::InvalidShape);
    }
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize))
        .ok_or(AccelError::InvalidShape)
}

fn last_dim(shape: &[u32]) -> usize {
    shape.last().map_or(1, |d| *d as usize)
}

/// Guest error, or trap for failures that are not the guest's.
type OpResult<T> = wasmtime::Result<Result<T, AccelError>>;

fn backend_err<T>(e: BackendError) -> OpResult<T> {
    match e {
        BackendError::OutOfMemory => Ok(Err(AccelError::OutOfMemory)),
        other => Err(wasmtime::Error::msg(format!(
            "accelerator backend failure: {other}"
        ))),
    }
}

/// Evaluates a guest-error expression inside an `OpResult` function.
macro_rules! guest_try {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        }
    };
}

impl AccelCtx {
    /// A context on `backend` allowing `limit` bytes of live tensors.
    pub fn new(backend: Arc<dyn Backend>, limit: u64) -> Self {
        AccelCtx {
            backend,
            table: ResourceTable::new(),
            live: 0,
            in_use: 0,
            limit,
            launches: 0,
        }
    }

    /// Number of op launches so far.
    pub fn launches(&self) -> u64 {
        self.launches
    }

    /// Accelerator bytes held by live tensors.
    pub fn bytes_in_use(&self) -> u64 {
        self.in_use
    }

    fn get(&self, t: &Resource<Tensor>) -> wasmtime::Result<&Tensor> {
        self.table
            .get(t)
            .map_err(|_| wasmtime::Error::new(PolicyViolation::BadHandle("tensor")))
    }

    /// Checks that `bytes` more fit in the budget.
    fn reserve(&self, bytes: u64) -> Result<(), AccelError> {
        if self.live >= MAX_TENSORS || self.in_use.saturating_add(bytes) > self.limit {
            return Err(AccelError::OutOfMemory);
        }
        Ok(())
    }

    /// Registers a new tensor (the caller reserved its bytes before computing it).
    pub(crate) fn insert(
        &mut self,
        shape: Vec<u32>,
        dtype: Dtype,
        buf: DeviceBuffer,
        downloadable: bool,
    ) -> wasmtime::Result<Result<Resource<Tensor>, AccelError>> {
        let elems = guest_try!(numel(&shape)) as u64;
        let bytes = elems * dtype_size(dtype);
        guest_try!(self.reserve(bytes));
        let res = self.table.push(Tensor {
            shape,
            dtype,
            buf,
            bytes,
            downloadable,
        })?;
        self.in_use += bytes;
        self.live += 1;
        Ok(Ok(res))
    }

    /// Validates `shape` and reserves room for a tensor of it (for producers outside
    /// this module, such as the model capability, before they do the work).
    pub(crate) fn check_alloc(&self, shape: &[u32], dtype: Dtype) -> Result<(), AccelError> {
        let elems = numel(shape)? as u64;
        self.reserve(elems * dtype_size(dtype))
    }

    pub(crate) fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Runs an op producing a tensor of `shape`: reserves, computes, registers.
    fn produce(
        &mut self,
        shape: Vec<u32>,
        compute: impl FnOnce(&dyn Backend) -> Result<DeviceBuffer, BackendError>,
    ) -> OpResult<Resource<Tensor>> {
        guest_try!(self.check_alloc(&shape, Dtype::F32));
        self.launches += 1;
        let buf = match compute(self.backend.as_ref()) {
            Ok(b) => b,
            Err(e) => return backend_err(e),
        };
        self.insert(shape, Dtype::F32, buf, true)
    }

    /// Shape of an f32 operand, or the guest error.
    fn f32_operand(&self, t: &Resource<Tensor>) -> wasmtime::Result<Result<Vec<u32>, AccelError>> {
        let t = self.get(t)?;
        if t.dtype != Dtype::F32 {
            return Ok(Err(AccelError::DtypeMismatch));
        }
        Ok(Ok(t.shape.clone()))
    }

    fn binary(
        &mut self,
        op: BinaryOp,
        a: Resource<Tensor>,
        b: Resource<Tensor>,
    ) -> OpResult<Resource<Tensor>> {
        let sa = guest_try!(self.f32_operand(&a)?);
        let sb = guest_try!(self.f32_operand(&b)?);
        let cols = last_dim(&sa);
        if sb != sa && sb != [cols as u32] {
            return Ok(Err(AccelError::ShapeMismatch));
        }
        guest_try!(self.check_alloc(&sa, Dtype::F32));
        let (ta, tb) = (self.get(&a)?, self.get(&b)?);
        let out = self.backend.binary(op, &ta.buf, &tb.buf, cols);
        self.produce(sa, |_| out)
    }

    fn unary(
        &mut self,
        x: Resource<Tensor>,
        f: impl FnOnce(&dyn Backend, &DeviceBuffer, usize) -> Result<DeviceBuffer, BackendError>,
    ) -> OpResult<Resource<Tensor>> {
        let shape = guest_try!(self.f32_operand(&x)?);
        guest_try!(self.check_alloc(&shape, Dtype::F32));
        let cols = last_dim(&shape);
        let out = f(self.backend.as_ref(), &self.get(&x)?.buf, cols);
        self.produce(shape, |_| out)
    }
}

impl HostTensor for AccelCtx {
    fn shape(&mut self, t: Resource<Tensor>) -> wasmtime::Result<Vec<u32>> {
        Ok(self.get(&t)?.shape.clone())
    }

    fn dtype(&mut self, t: Resource<Tensor>) -> wasmtime::Result<Dtype> {
        Ok(self.get(&t)?.dtype)
    }

    fn drop(&mut self, t: Resource<Tensor>) -> wasmtime::Result<()> {
        let t = self
            .table
            .delete(t)
            .map_err(|_| wasmtime::Error::new(PolicyViolation::BadHandle("tensor")))?;
        self.in_use -= t.bytes;
        self.live -= 1;
        Ok(())
    }
}

impl Host for AccelCtx {
    fn zeros(&mut self, ty: Dtype, shape: Vec<u32>) -> OpResult<Resource<Tensor>> {
        guest_try!(self.check_alloc(&shape, ty));
        let n = guest_try!(numel(&shape));
        self.produce(shape, |b| b.zeros(n))
    }

    fn upload(&mut self, shape: Vec<u32>, data: Vec<f32>) -> OpResult<Resource<Tensor>> {
        let n = guest_try!(numel(&shape));
        if n != data.len() {
            return Ok(Err(AccelError::LengthMismatch));
        }
        self.produce(shape, |b| b.upload(&data))
    }

    fn download(&mut self, t: Resource<Tensor>) -> OpResult<Vec<f32>> {
        let t = self.get(&t)?;
        if !t.downloadable {
            return Ok(Err(AccelError::NotDownloadable));
        }
        match self.backend.download(&t.buf) {
            Ok(v) => Ok(Ok(v)),
            Err(e) => backend_err(e),
        }
    }

    fn matmul(&mut self, x: Resource<Tensor>, w: Resource<Tensor>) -> OpResult<Resource<Tensor>> {
        let sx = guest_try!(self.f32_operand(&x)?);
        let sw = guest_try!(self.f32_operand(&w)?);
        let ([m, k], [n, kw]) = (sx.as_slice(), sw.as_slice()) else {
            return Ok(Err(AccelError::ShapeMismatch));
        };
        if k != kw {
            return Ok(Err(AccelError::ShapeMismatch));
        }
        let (m, k, n) = (*m as usize, *k as usize, *n as usize);
        if (m as u64) * (k as u64) * (n as u64) > MAX_MATMUL_WORK {
            return Ok(Err(AccelError::InvalidArgument));
        }
        let out_shape = vec![m as u32, n as u32];
        guest_try!(self.check_alloc(&out_shape, Dtype::F32));
        let out = self
            .backend
            .matmul(&self.get(&x)?.buf, &self.get(&w)?.buf, m, k, n);
        self.produce(out_shape, |_| out)
    }

    fn add(&mut self, a: Resource<Tensor>, b: Resource<Tensor>) -> OpResult<Resource<Tensor>> {
        self.binary(BinaryOp::Add, a, b)
    }

    fn mul(&mut self, a: Resource<Tensor>, b: Resource<Tensor>) -> OpResult<Resource<Tensor>> {
        self.binary(BinaryOp::Mul, a, b)
    }

    fn rmsnorm(
        &mut self,
        x: Resource<Tensor>,
        weight: Resource<Tensor>,
        eps: f32,
    ) -> OpResult<Resource<Tensor>> {
        let sx = guest_try!(self.f32_operand(&x)?);
        let sw = guest_try!(self.f32_operand(&weight)?);
        let cols = last_dim(&sx);
        if sw != [cols as u32] {
            return Ok(Err(AccelError::ShapeMismatch));
        }
        if !eps.is_finite() || eps < 0.0 {
            return Ok(Err(AccelError::InvalidArgument));
        }
        guest_try!(self.check_alloc(&sx, Dtype::F32));
        let out = self
            .backend
            .rmsnorm(&self.get(&x)?.buf, &self.get(&weight)?.buf, cols, eps);
        self.produce(sx, |_| out)
    }

    fn softmax(&mut self, x: Resource<Tensor>) -> OpResult<Resource<Tensor>> {
        self.unary(x, |b, buf, cols| b.softmax(buf, cols))
    }

    fn silu(&mut self, x: Resource<Tensor>) -> OpResult<Resource<Tensor>> {
        self.unary(x, |b, buf, _| b.silu(buf))
    }

    fn rope(&mut self, x: Resource<Tensor>, pos: u32, theta: f32) -> OpResult<Resource<Tensor>> {
        let sx = guest_try!(self.f32_operand(&x)?);
        let [seq, heads, head_dim] = sx.as_slice() else {
            return Ok(Err(AccelError::ShapeMismatch));
        };
        if head_dim % 2 != 0 {
            return Ok(Err(AccelError::ShapeMismatch));
        }
        if !theta.is_finite() || theta <= 1.0 || pos.checked_add(*seq).is_none() {
            return Ok(Err(AccelError::InvalidArgument));
        }
        let (heads, head_dim) = (*heads as usize, *head_dim as usize);
        self.unary(x, |b, buf, _| b.rope(buf, heads, head_dim, pos, theta))
    }

    fn argmax(&mut self, x: Resource<Tensor>) -> OpResult<Vec<u32>> {
        let sx = guest_try!(self.f32_operand(&x)?);
        self.launches += 1;
        match self.backend.argmax(&self.get(&x)?.buf, last_dim(&sx)) {
            Ok(v) => Ok(Ok(v)),
            Err(e) => backend_err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuBackend;

    fn ctx(limit: u64) -> AccelCtx {
        AccelCtx::new(Arc::new(CpuBackend::default()), limit)
    }

    fn ok<T>(r: OpResult<T>) -> T {
        match r {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => panic!("guest error {e:?}"),
            Err(e) => panic!("trap {e}"),
        }
    }

    fn guest_err<T: std::fmt::Debug>(r: OpResult<T>) -> AccelError {
        match r {
            Ok(Err(e)) => e,
            other => panic!("expected a guest error, got {other:?}"),
        }
    }

    fn t(c: &mut AccelCtx, shape: &[u32], data: &[f32]) -> Resource<Tensor> {
        ok(c.upload(shape.to_vec(), data.to_vec()))
    }

    fn borrow(r: &Resource<Tensor>) -> Resource<Tensor> {
        Resource::new_borrow(r.rep())
    }

    #[test]
    fn shapes_are_checked_on_every_launch() {
        let mut c = ctx(1 << 20);
        let a = t(&mut c, &[2, 3], &[1.0; 6]);
        let b = t(&mut c, &[2, 2], &[1.0; 4]);
        assert_eq!(
            guest_err(c.matmul(borrow(&a), borrow(&b))),
            AccelError::ShapeMismatch
        );
        assert_eq!(
            guest_err(c.add(borrow(&a), borrow(&b))),
            AccelError::ShapeMismatch
        );
        assert_eq!(
            guest_err(c.rmsnorm(borrow(&a), borrow(&b), 1e-5)),
            AccelError::ShapeMismatch
        );
        assert_eq!(
            guest_err(c.rope(borrow(&a), 0, 10000.0)),
            AccelError::ShapeMismatch
        );
        let odd = t(&mut c, &[1, 1, 3], &[1.0; 3]);
        assert_eq!(
            guest_err(c.rope(borrow(&odd), 0, 10000.0)),
            AccelError::ShapeMismatch
        );
        let even = t(&mut c, &[1, 1, 2], &[1.0; 2]);
        assert_eq!(
            guest_err(c.rope(borrow(&even), u32::MAX, 10000.0)),
            AccelError::InvalidArgument
        );
        assert_eq!(
            guest_err(c.rope(borrow(&even), 0, f32::NAN)),
            AccelError::InvalidArgument
        );
        let w = t(&mut c, &[3], &[1.0; 3]);
        assert_eq!(
            guest_err(c.rmsnorm(borrow(&a), borrow(&w), -1.0)),
            AccelError::InvalidArgument
        );
        assert_eq!(
            guest_err(c.upload(vec![2, 2], vec![1.0; 3])),
            AccelError::LengthMismatch
        );
        assert_eq!(
            guest_err(c.upload(vec![], vec![])),
            AccelError::InvalidShape
        );
        assert_eq!(
            guest_err(c.upload(vec![0, 4], vec![])),
            AccelError::InvalidShape
        );
        assert_eq!(
            guest_err(c.zeros(Dtype::F32, vec![1, 1, 1, 1, 1])),
            AccelError::InvalidShape
        );
        assert_eq!(
            guest_err(c.zeros(Dtype::F32, vec![u32::MAX, u32::MAX, u32::MAX])),
            AccelError::InvalidShape
        );
    }

    #[test]
    fn memory_budget_is_enforced_and_released_on_drop() {
        let mut c = ctx(64);
        let a = ok(c.zeros(Dtype::F32, vec![16]));
        assert_eq!(c.bytes_in_use(), 64);
        assert_eq!(
            guest_err(c.zeros(Dtype::F32, vec![1])),
            AccelError::OutOfMemory
        );
        assert_eq!(guest_err(c.silu(borrow(&a))), AccelError::OutOfMemory);
        c.drop(a).expect("drop");
        assert_eq!(c.bytes_in_use(), 0);
        ok(c.zeros(Dtype::F32, vec![16]));
    }

    #[test]
    fn oversized_matmul_is_refused_before_work() {
        let mut c = ctx(u64::MAX);
        let x = ok(c.zeros(Dtype::F32, vec![4096, 4096]));
        let w = ok(c.zeros(Dtype::F32, vec![4096, 4096]));
        assert_eq!(
            guest_err(c.matmul(borrow(&x), borrow(&w))),
            AccelError::InvalidArgument
        );
    }

    #[test]
    fn ops_compute_through_the_backend() {
        let mut c = ctx(1 << 20);
        let x = t(&mut c, &[1, 2], &[1.0, 2.0]);
        let w = t(&mut c, &[3, 2], &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
        let y = ok(c.matmul(borrow(&x), borrow(&w)));
        assert_eq!(ok(c.shape(borrow(&y)).map(Ok)), vec![1, 3]);
        assert_eq!(ok(c.download(borrow(&y))), vec![1.0, 2.0, 3.0]);
        assert_eq!(ok(c.argmax(borrow(&y))), vec![2]);
        assert!(c.launches() >= 3);
    }

    #[test]
    fn weights_cannot_be_downloaded() {
        let mut c = ctx(1 << 20);
        let w = ok(c.insert(
            vec![2],
            Dtype::F32,
            DeviceBuffer::Host(vec![0.5, 0.25]),
            false,
        ));
        assert_eq!(
            guest_err(c.download(borrow(&w))),
            AccelError::NotDownloadable
        );
        // Ops on weights still work, and their results are activations.
        let y = ok(c.silu(borrow(&w)));
        assert_eq!(ok(c.download(borrow(&y))).len(), 2);
    }

    #[test]
    fn stale_handles_trap() {
        let mut c = ctx(1 << 20);
        let a = ok(c.zeros(Dtype::F32, vec![1]));
        let stale = borrow(&a);
        c.drop(a).expect("drop");
        let err = c.silu(stale).unwrap_err();
        assert_eq!(
            err.downcast_ref::<PolicyViolation>(),
            Some(&PolicyViolation::BadHandle("tensor"))
        );
    }
}
