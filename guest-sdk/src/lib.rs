//! `cinfer-guest`: the SDK cinfer programs are written with.
//!
//! A program is a Wasm component for the `cinfer:loader/program` world. It gets
//! no WASI at all; its only way to see or affect the world is the four
//! capabilities the trusted loader grants it (and a policy may grant fewer):
//!
//! * [`request`]: the cleartext of the sealed request (the loader opened it);
//! * [`accel`]: tensors in accelerator memory and a fixed op set;
//! * [`model`]: sealed models whose weights load straight into the accelerator;
//! * [`output`]: reply chunks, sealed to the requester by the loader.
//!
//! A whole program:
//!
//! ```ignore
//! struct Echo;
//! impl cinfer_guest::Program for Echo {
//!     fn run() -> Result<(), cinfer_guest::Error> {
//!         let request = cinfer_guest::request::open()?;
//!         cinfer_guest::output::emit(&request);
//!         Ok(())
//!     }
//! }
//! cinfer_guest::program!(Echo);
//! ```
//!
//! Build programs for `wasm32-unknown-unknown` and encode them into components
//! with `cargo run --release -p build-programs` (see the README): a
//! `wasm32-wasip2` build would import WASI through std, and the loader refuses it.
#![forbid(unsafe_code)]

/// Raw bindings generated from `wit/loader.wit`.
#[allow(missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "program",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "export_program",
        default_bindings_module: "cinfer_guest::bindings",
    });
}

use bindings::cinfer::loader::{accelerator as raw_accel, crypto, model as raw_model};

pub use crypto::CryptoError;
pub use raw_accel::{AccelError, Dtype};
pub use raw_model::ModelError;

/// Any failure a program can see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// From the `crypto` capability.
    Crypto(CryptoError),
    /// From the `accelerator` capability.
    Accel(AccelError),
    /// From the `model` capability.
    Model(ModelError),
    /// The request is not what this program expects.
    BadRequest,
}

impl From<CryptoError> for Error {
    fn from(e: CryptoError) -> Self {
        Error::Crypto(e)
    }
}
impl From<AccelError> for Error {
    fn from(e: AccelError) -> Self {
        Error::Accel(e)
    }
}
impl From<ModelError> for Error {
    fn from(e: ModelError) -> Self {
        Error::Model(e)
    }
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Crypto(e) => write!(f, "crypto: {e:?}"),
            Error::Accel(e) => write!(f, "accelerator: {e:?}"),
            Error::Model(e) => write!(f, "model: {e:?}"),
            Error::BadRequest => f.write_str("bad request"),
        }
    }
}

/// A program: one `run` per request.
pub trait Program {
    /// Handles the current request. An `Err` ends the run as failed; tell the
    /// requester why through [`output`] first (the reply is sealed, while the
    /// untrusted side only learns that the run failed).
    fn run() -> Result<(), Error>;
}

/// Exports a [`Program`] implementation as the component's `run`.
#[macro_export]
macro_rules! program {
    ($ty:ident) => {
        impl $crate::bindings::Guest for $ty {
            fn run() -> ::core::result::Result<(), ()> {
                <$ty as $crate::Program>::run().map_err(|_| ())
            }
        }
        $crate::bindings::export_program!($ty);
    };
}

/// The sealed request of the current run.
pub mod request {
    use super::{Error, crypto};

    /// The request's cleartext. Can be taken once per run.
    pub fn open() -> Result<Vec<u8>, Error> {
        Ok(crypto::open_request()?)
    }

    /// The request's length in bytes.
    pub fn len() -> Result<u64, Error> {
        Ok(crypto::request_len()?)
    }
}

/// The reply: every chunk is sealed by the loader before it leaves.
pub mod output {
    use super::bindings::cinfer::loader::output as raw;

    /// Emits a chunk of the reply. Exceeding the policy's egress budget ends the run.
    pub fn emit(bytes: &[u8]) {
        raw::emit(bytes);
    }

    /// Emits a UTF-8 chunk.
    pub fn emit_str(text: &str) {
        raw::emit(text.as_bytes());
    }
}

/// Tensors in accelerator memory.
pub mod accel {
    use super::{AccelError, Dtype, raw_accel};

    /// A tensor handle. Dropping it frees the accelerator memory.
    #[derive(Debug)]
    pub struct Tensor(raw_accel::Tensor);

    impl Tensor {
        /// A zero-filled f32 tensor.
        pub fn zeros(shape: &[u32]) -> Result<Self, AccelError> {
            raw_accel::zeros(Dtype::F32, shape).map(Tensor)
        }

        /// A zero-filled tensor of `ty` (f32 or f16; f16 suits KV caches).
        pub fn zeros_of(ty: Dtype, shape: &[u32]) -> Result<Self, AccelError> {
            raw_accel::zeros(ty, shape).map(Tensor)
        }

        /// Uploads row-major f32 data.
        pub fn from_f32(shape: &[u32], data: &[f32]) -> Result<Self, AccelError> {
            raw_accel::upload(shape, data).map(Tensor)
        }

        /// Wraps a raw handle (from the model capability).
        pub fn from_raw(raw: raw_accel::Tensor) -> Self {
            Tensor(raw)
        }

        /// The tensor's shape.
        pub fn shape(&self) -> Vec<u32> {
            self.0.shape()
        }

        /// The element type.
        pub fn dtype(&self) -> Dtype {
            self.0.dtype()
        }

        /// Reads the tensor back. Refused for model weights.
        pub fn to_vec(&self) -> Result<Vec<f32>, AccelError> {
            raw_accel::download(&self.0)
        }

        /// A copy with another shape of the same element count.
        pub fn reshape(&self, shape: &[u32]) -> Result<Tensor, AccelError> {
            raw_accel::reshape(&self.0, shape).map(Tensor)
        }

        /// Rows `start .. start + count` of the tensor viewed as [rows, last dimension].
        pub fn rows(&self, start: u32, count: u32) -> Result<Tensor, AccelError> {
            raw_accel::rows(&self.0, start, count).map(Tensor)
        }

        /// Rows `ids` of this table (any dtype) as f32 [len(ids), d].
        pub fn embedding(&self, ids: &[u32]) -> Result<Tensor, AccelError> {
            raw_accel::embedding(&self.0, ids).map(Tensor)
        }

        /// Causal GQA attention of `self` (q [seq, heads, hd]) with new keys and
        /// values [seq, kv-heads, hd], appended to the caches at `pos`.
        pub fn attention(
            &self,
            k: &Tensor,
            v: &Tensor,
            k_cache: &Tensor,
            v_cache: &Tensor,
            pos: u32,
        ) -> Result<Tensor, AccelError> {
            raw_accel::attention(&self.0, &k.0, &v.0, &k_cache.0, &v_cache.0, pos).map(Tensor)
        }

        /// [`attention`](Self::attention) with rotary embedding at `pos` (base
        /// `theta`) applied to q and k first, on flat heads: `self` (q) is
        /// [seq, heads × hd], `k` and `v` [seq, kv-heads × hd]; kv-heads and hd
        /// come from the caches' shape. Returns [seq, heads × hd]. One launch,
        /// the same results as reshape, `rope` and `attention` call by call.
        pub fn rope_attention(
            &self,
            k: &Tensor,
            v: &Tensor,
            k_cache: &Tensor,
            v_cache: &Tensor,
            pos: u32,
            theta: f32,
        ) -> Result<Tensor, AccelError> {
            raw_accel::rope_attention(&self.0, &k.0, &v.0, &k_cache.0, &v_cache.0, pos, theta)
                .map(Tensor)
        }

        /// One llama decoder layer in one call (see `decoder-layer` in
        /// `wit/loader.wit`): `ws` = [attn-norm, wq, wk, wv, wo, ffn-norm,
        /// w-gate, w-up, w-down]; exactly the results of norm-matmul-many,
        /// rope-attention, matmul-add, norm-matmul-many, silu-mul and
        /// matmul-add made one by one.
        #[allow(clippy::too_many_arguments)]
        pub fn decoder_layer(
            &self,
            ws: &[&Tensor; 9],
            k_cache: &Tensor,
            v_cache: &Tensor,
            pos: u32,
            eps: f32,
            theta: f32,
        ) -> Result<Tensor, AccelError> {
            let raw: Vec<&raw_accel::Tensor> = ws.iter().map(|t| &t.0).collect();
            raw_accel::decoder_layer(&self.0, &raw, &k_cache.0, &v_cache.0, pos, eps, theta)
                .map(Tensor)
        }

        /// Llama decoder layers in one call (see `decoder-stack` in
        /// `wit/loader.wit`): layer i takes `ws[9i..9i+9]` (as
        /// [`decoder_layer`](Self::decoder_layer)) and the caches
        /// `caches[2i]`, `caches[2i+1]`; the last layer's output, bit for bit
        /// what the layers give one by one.
        pub fn decoder_stack(
            &self,
            ws: &[&Tensor],
            caches: &[&Tensor],
            pos: u32,
            eps: f32,
            theta: f32,
        ) -> Result<Tensor, AccelError> {
            let ws: Vec<&raw_accel::Tensor> = ws.iter().map(|t| &t.0).collect();
            let caches: Vec<&raw_accel::Tensor> = caches.iter().map(|t| &t.0).collect();
            raw_accel::decoder_stack(&self.0, &ws, &caches, pos, eps, theta).map(Tensor)
        }

        /// The `k` largest (index, value) pairs of the last row, largest first.
        pub fn top_k(&self, k: u32) -> Result<Vec<(u32, f32)>, AccelError> {
            raw_accel::top_k(&self.0, k)
        }

        /// `self` [m, k] times `w` [n, k] transposed: [m, n].
        pub fn matmul(&self, w: &Tensor) -> Result<Tensor, AccelError> {
            raw_accel::matmul(&self.0, &w.0).map(Tensor)
        }

        /// [`matmul`](Self::matmul) with each of `ws` (1 to 8) in one launch: the same
        /// results, `self` prepared once.
        pub fn matmul_many(&self, ws: &[&Tensor]) -> Result<Vec<Tensor>, AccelError> {
            let raw: Vec<&raw_accel::Tensor> = ws.iter().map(|w| &w.0).collect();
            raw_accel::matmul_many(&self.0, &raw).map(|v| v.into_iter().map(Tensor).collect())
        }

        /// [`matmul_many`](Self::matmul_many) of `rmsnorm(self, weight, eps)`, in
        /// one launch: the same results as the two calls.
        pub fn norm_matmul_many(
            &self,
            weight: &Tensor,
            eps: f32,
            ws: &[&Tensor],
        ) -> Result<Vec<Tensor>, AccelError> {
            let raw: Vec<&raw_accel::Tensor> = ws.iter().map(|w| &w.0).collect();
            raw_accel::norm_matmul_many(&self.0, &weight.0, eps, &raw)
                .map(|v| v.into_iter().map(Tensor).collect())
        }

        /// `r + self · wᵀ` in one launch (a projection and its residual); `r` is [m, n].
        pub fn matmul_add(&self, w: &Tensor, r: &Tensor) -> Result<Tensor, AccelError> {
            raw_accel::matmul_add(&self.0, &w.0, &r.0).map(Tensor)
        }

        /// `silu(self) · up` in one launch (SwiGLU); `up` has `self`'s shape.
        pub fn silu_mul(&self, up: &Tensor) -> Result<Tensor, AccelError> {
            raw_accel::silu_mul(&self.0, &up.0).map(Tensor)
        }

        /// Elementwise sum (`b` may be a row broadcast over the last dimension).
        pub fn add(&self, b: &Tensor) -> Result<Tensor, AccelError> {
            raw_accel::add(&self.0, &b.0).map(Tensor)
        }

        /// Elementwise product (`b` may be a row broadcast over the last dimension).
        pub fn mul(&self, b: &Tensor) -> Result<Tensor, AccelError> {
            raw_accel::mul(&self.0, &b.0).map(Tensor)
        }

        /// RMS normalisation over the last dimension, scaled by `weight`.
        pub fn rmsnorm(&self, weight: &Tensor, eps: f32) -> Result<Tensor, AccelError> {
            raw_accel::rmsnorm(&self.0, &weight.0, eps).map(Tensor)
        }

        /// Softmax over the last dimension.
        pub fn softmax(&self) -> Result<Tensor, AccelError> {
            raw_accel::softmax(&self.0).map(Tensor)
        }

        /// SiLU, elementwise.
        pub fn silu(&self) -> Result<Tensor, AccelError> {
            raw_accel::silu(&self.0).map(Tensor)
        }

        /// Rotary embedding of [seq, heads, head-dim] starting at position `pos`.
        pub fn rope(&self, pos: u32, theta: f32) -> Result<Tensor, AccelError> {
            raw_accel::rope(&self.0, pos, theta).map(Tensor)
        }

        /// Index of each row's largest element.
        pub fn argmax(&self) -> Result<Vec<u32>, AccelError> {
            raw_accel::argmax(&self.0)
        }
    }
}

/// Sealed models.
pub mod model {
    use super::{ModelError, accel::Tensor, raw_model};

    /// An opened sealed model.
    #[derive(Debug)]
    pub struct Model(raw_model::SealedModel);

    impl Model {
        /// Opens the model `id`, if the policy allows it.
        pub fn open(id: &str) -> Result<Self, ModelError> {
            raw_model::SealedModel::open(id).map(Model)
        }

        /// The GGUF key/value metadata section.
        pub fn metadata(&self) -> Result<Vec<u8>, ModelError> {
            self.0.metadata()
        }

        /// The metadata pairs whose key is in `keys`, or starts with an entry's text before a
        /// final `*` (`["general.*", "llama.*"]`), as a metadata-only GGUF: a few keys without
        /// copying megabytes of vocabulary. At most 64 entries (more trap).
        pub fn metadata_keys(&self, keys: &[&str]) -> Result<Vec<u8>, ModelError> {
            let keys: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
            self.0.metadata_keys(&keys)
        }

        /// Loads a weight tensor straight into accelerator memory.
        pub fn load_tensor(&self, name: &str) -> Result<Tensor, ModelError> {
            self.0.load_tensor(name).map(Tensor::from_raw)
        }
    }
}
