//! `cinfer:loader/model`: sealed models, opened by id, whose weights are
//! decrypted straight into accelerator memory.
//!
//! A program may open only the model ids its policy entry lists. Tensors
//! loaded from a model are marked not downloadable, so weight cleartext never
//! enters guest memory. Model sources plug in through [`ModelSource`]
//! (sealed GGUF files: `crate::models::SealedGguf`); a serving loader's
//! [`ModelStore`] is filled as the keyserver releases model keys, and until
//! then `open` answers `not-found`.

use super::PolicyViolation;
use super::accelerator::{AccelCtx, Tensor};
use crate::backend::{DeviceBuffer, ElemType};
use crate::bindings::accelerator::AccelError;
pub use crate::bindings::model::ModelError;
use crate::bindings::model::{Host, HostSealedModel};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use wasmtime::component::{Resource, ResourceTable};

/// Most key patterns one `metadata-keys` call may pass (the WIT says so).
const MAX_METADATA_KEYS: usize = 64;

/// A model the loader can serve: metadata and tensors, decrypted on demand.
pub trait ModelSource: Send + Sync + std::fmt::Debug {
    /// The non-weight metadata (GGUF key/value section).
    fn metadata(&self) -> Result<Vec<u8>, ModelError>;
    /// The key/value pairs of the metadata whose key `keep` accepts, as a
    /// metadata-only GGUF.
    fn metadata_subset(&self, keep: &dyn Fn(&str) -> bool) -> Result<Vec<u8>, ModelError> {
        cinfer_gguf::write::metadata_subset(&self.metadata()?, keep)
            .map_err(|_| ModelError::Corrupt)
    }
    /// Shape (outermost dimension first) and element type of the named tensor.
    fn tensor_shape(&self, name: &str) -> Result<(Vec<u32>, ElemType), ModelError>;
    /// Decrypts the named tensor into device memory on `backend`.
    fn load_tensor(
        &self,
        name: &str,
        backend: &dyn crate::backend::Backend,
    ) -> Result<DeviceBuffer, ModelError>;
}

/// A model and its resident (already decrypted) tensors.
#[derive(Debug)]
struct ModelEntry {
    source: Arc<dyn ModelSource>,
    /// Weights decrypted by an earlier run, shared read-only by later runs,
    /// like weights kept resident in GPU memory.
    resident: Mutex<HashMap<String, Arc<DeviceBuffer>>>,
}

/// The models this loader holds, by id.
#[derive(Debug, Default, Clone)]
pub struct ModelStore {
    models: HashMap<String, Arc<ModelEntry>>,
}

impl ModelStore {
    /// Adds (or replaces) a model.
    pub fn insert(&mut self, id: impl Into<String>, source: Arc<dyn ModelSource>) {
        self.models.insert(
            id.into(),
            Arc::new(ModelEntry {
                source,
                resident: Mutex::new(HashMap::new()),
            }),
        );
    }
}

/// An opened model (the guest's `sealed-model` resource).
#[derive(Debug)]
pub struct OpenModel {
    entry: Arc<ModelEntry>,
}

/// The model state of one run.
#[derive(Debug)]
pub struct ModelCtx {
    allowed: Arc<[String]>,
    store: Arc<ModelStore>,
    table: ResourceTable,
}

impl ModelCtx {
    /// A context that may open the `allowed` ids of `store`.
    pub fn new(allowed: Arc<[String]>, store: Arc<ModelStore>) -> Self {
        ModelCtx {
            allowed,
            store,
            table: ResourceTable::new(),
        }
    }
}

/// The view the model capability works on: its own state plus the
/// accelerator, where loaded tensors go.
#[derive(Debug)]
pub struct ModelView<'a> {
    /// Model state.
    pub model: &'a mut ModelCtx,
    /// Accelerator state.
    pub accel: &'a mut AccelCtx,
}

impl ModelView<'_> {
    fn get(&self, m: &Resource<OpenModel>) -> wasmtime::Result<&OpenModel> {
        self.model
            .table
            .get(m)
            .map_err(|_| wasmtime::Error::new(PolicyViolation::BadHandle("sealed-model")))
    }
}

impl HostSealedModel for ModelView<'_> {
    fn open(&mut self, id: String) -> wasmtime::Result<Result<Resource<OpenModel>, ModelError>> {
        if !self.model.allowed.contains(&id) {
            return Ok(Err(ModelError::NotPermitted));
        }
        let Some(entry) = self.model.store.models.get(&id).cloned() else {
            return Ok(Err(ModelError::NotFound));
        };
        Ok(Ok(self.model.table.push(OpenModel { entry })?))
    }

    fn metadata(
        &mut self,
        m: Resource<OpenModel>,
    ) -> wasmtime::Result<Result<Vec<u8>, ModelError>> {
        Ok(self.get(&m)?.entry.source.metadata())
    }

    fn metadata_keys(
        &mut self,
        m: Resource<OpenModel>,
        keys: Vec<String>,
    ) -> wasmtime::Result<Result<Vec<u8>, ModelError>> {
        if keys.len() > MAX_METADATA_KEYS {
            return Err(wasmtime::Error::new(PolicyViolation::ArgumentBound(
                "metadata-keys takes at most 64 keys",
            )));
        }
        let keep = |k: &str| {
            keys.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => k.starts_with(prefix),
                None => k == p,
            })
        };
        Ok(self.get(&m)?.entry.source.metadata_subset(&keep))
    }

    fn load_tensor(
        &mut self,
        m: Resource<OpenModel>,
        name: String,
    ) -> wasmtime::Result<Result<Resource<Tensor>, ModelError>> {
        let entry = self.get(&m)?.entry.clone();
        let (shape, ty) = match entry.source.tensor_shape(&name) {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        match self.accel.check_alloc(&shape, ty) {
            Ok(()) => {}
            Err(AccelError::OutOfMemory) => return Ok(Err(ModelError::OutOfMemory)),
            Err(_) => return Ok(Err(ModelError::Corrupt)),
        }
        let cached = entry
            .resident
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&name)
            .cloned();
        let buf = match cached {
            Some(b) => b,
            None => {
                let b = match entry
                    .source
                    .load_tensor(&name, self.accel.backend().as_ref())
                {
                    Ok(b) => Arc::new(b),
                    Err(e) => return Ok(Err(e)),
                };
                if b.elem_type() != ty {
                    return Ok(Err(ModelError::Corrupt));
                }
                entry
                    .resident
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(name, b.clone());
                b
            }
        };
        Ok(match self.accel.insert_shared(shape, buf, false)? {
            Ok(t) => Ok(t),
            Err(AccelError::OutOfMemory) => Err(ModelError::OutOfMemory),
            Err(_) => Err(ModelError::Corrupt),
        })
    }

    fn drop(&mut self, m: Resource<OpenModel>) -> wasmtime::Result<()> {
        self.model
            .table
            .delete(m)
            .map_err(|_| wasmtime::Error::new(PolicyViolation::BadHandle("sealed-model")))?;
        Ok(())
    }
}

impl Host for ModelView<'_> {}
