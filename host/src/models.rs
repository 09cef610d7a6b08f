//! Sealed GGUF models as a [`ModelSource`].
//!
//! At registration the loader decrypts only the GGUF header (metadata and
//! tensor infos, a few MB for a tokenizer-carrying model); each `load-tensor`
//! then decrypts just the chunks covering that tensor, parses the blocks and
//! hands them to the backend. The sealed file is read with positional reads,
//! never loaded whole, so peak memory is the decrypted weights plus one chunk.

use crate::backend::{Backend, DeviceBuffer, ElemType, quant};
use crate::caps::model::{ModelError, ModelSource};
use cinfer_gguf::{GgmlType, GgufError, TensorInfo};
use cinfer_sealed_model::{ModelKey, Opened, ReadAt, SealError};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use zeroize::Zeroizing;

/// Why a sealed model could not be registered. Each message includes its
/// cause, so the variants do not also report it as a `source` (an error
/// chain printed in full would say everything twice).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelLoadError {
    /// The sealed container was refused.
    #[error("sealed model: {0}")]
    Sealed(SealError),
    /// The decrypted bytes are not a usable GGUF file.
    #[error("GGUF: {0}")]
    Gguf(GgufError),
    /// A tensor lies outside the file or has an impossible shape.
    #[error("tensor `{0}` lies outside the model data or has an unusable shape")]
    BadTensor(String),
}

impl From<SealError> for ModelLoadError {
    fn from(e: SealError) -> Self {
        ModelLoadError::Sealed(e)
    }
}

impl From<GgufError> for ModelLoadError {
    fn from(e: GgufError) -> Self {
        ModelLoadError::Gguf(e)
    }
}

/// Decrypted chunks kept for reuse: small tensors share chunks with their
/// neighbours, so loading a model tensor by tensor would otherwise decrypt
/// many chunks more than once.
const CHUNK_CACHE: usize = 8;

/// A decrypted chunk, by index (zeroized when the last reference goes).
type Chunk = (u64, Arc<Zeroizing<Vec<u8>>>);

/// A sealed GGUF model.
pub struct SealedGguf {
    opened: Opened<Box<dyn ReadAt>>,
    recent: Mutex<Vec<Chunk>>,
    metadata: Zeroizing<Vec<u8>>,
    /// Each key of the metadata and the span of its pair in `metadata`.
    kv_spans: Vec<(String, std::ops::Range<usize>)>,
    tensors: HashMap<String, TensorInfo>,
    data_offset: u64,
}

impl std::fmt::Debug for SealedGguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedGguf")
            .field("header", self.opened.header())
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

fn elem_type(t: GgmlType) -> ElemType {
    match t {
        GgmlType::F32 => ElemType::F32,
        GgmlType::F16 => ElemType::F16,
        GgmlType::Q4_1 => ElemType::Q4_1,
        GgmlType::Q8_0 => ElemType::Q8_0,
    }
}

impl SealedGguf {
    /// Opens a sealed model and decrypts its GGUF header.
    pub fn open(source: Box<dyn ReadAt>, key: &ModelKey) -> Result<Self, ModelLoadError> {
        let opened = Opened::open(source, key)?;
        let total = opened.header().plaintext_len;
        let mut len = u64::from(opened.header().chunk_size).min(total);
        // Grow the decrypted prefix until the whole GGUF header fits.
        let (metadata, tensors, data_offset) = loop {
            let mut prefix = Zeroizing::new(vec![0u8; len as usize]);
            opened.read_plain(0, &mut prefix)?;
            match cinfer_gguf::parse(&prefix) {
                Ok(g) => {
                    let mut tensors = HashMap::with_capacity(g.tensors.len());
                    for t in &g.tensors {
                        let end = g
                            .data_offset
                            .checked_add(t.offset)
                            .and_then(|o| o.checked_add(t.size));
                        if end.is_none_or(|e| e > total)
                            || t.dims.iter().any(|d| *d > u64::from(u32::MAX))
                        {
                            return Err(ModelLoadError::BadTensor(t.name.clone()));
                        }
                        tensors.insert(t.name.clone(), t.clone());
                    }
                    break (
                        Zeroizing::new(prefix[..g.kv_end].to_vec()),
                        tensors,
                        g.data_offset,
                    );
                }
                Err(GgufError::Truncated(_)) if len < total => len = (len * 2).min(total),
                Err(e) => return Err(e.into()),
            }
        };
        let kv_spans = cinfer_gguf::kv_spans(&metadata)?
            .into_iter()
            .map(|(k, s)| (k.to_owned(), s))
            .collect();
        Ok(SealedGguf {
            opened,
            recent: Mutex::new(Vec::new()),
            metadata,
            kv_spans,
            tensors,
            data_offset,
        })
    }

    /// The model id in the sealed header.
    pub fn model_id(&self) -> &str {
        &self.opened.header().model_id
    }

    /// SHA-256 of the plaintext GGUF (from the authenticated header).
    pub fn plaintext_sha256(&self) -> [u8; 32] {
        self.opened.header().plaintext_sha256
    }

    /// Decrypts plaintext `[offset, offset + out.len())`: the chunks it spans
    /// are decrypted in parallel (reusing recently decrypted ones).
    fn read_plain(&self, offset: u64, out: &mut [u8]) -> Result<(), SealError> {
        if out.is_empty() {
            return Ok(());
        }
        let plaintext_len = self.opened.header().plaintext_len;
        let len = out.len() as u64;
        if offset
            .checked_add(len)
            .is_none_or(|end| end > plaintext_len)
        {
            return Err(SealError::Range {
                offset,
                len,
                plaintext_len,
            });
        }
        let cs = u64::from(self.opened.header().chunk_size);
        // Split `out` at chunk boundaries: (chunk index, offset within it, piece).
        let mut pieces = Vec::new();
        let (mut rest, mut pos) = (out, offset);
        while !rest.is_empty() {
            let (index, within) = (pos / cs, (pos % cs) as usize);
            let n = rest.len().min(cs as usize - within);
            let (piece, tail) = rest.split_at_mut(n);
            pieces.push((index, within, piece));
            rest = tail;
            pos += n as u64;
        }
        let edges = [pieces[0].0, pieces[pieces.len() - 1].0];
        let cached: Vec<Chunk> = self
            .recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        // Decrypt in parallel; each worker reuses one scratch buffer. Edge
        // chunks (shared with neighbouring tensors) are kept for reuse.
        let kept: Vec<Chunk> = pieces
            .into_par_iter()
            .map_init(
                || Zeroizing::new(Vec::new()),
                |scratch, (index, within, piece)| -> Result<Option<Chunk>, SealError> {
                    if let Some((_, c)) = cached.iter().find(|(j, _)| *j == index) {
                        piece.copy_from_slice(&c[within..within + piece.len()]);
                        return Ok(None);
                    }
                    self.opened.decrypt_chunk(index, scratch)?;
                    piece.copy_from_slice(&scratch[within..within + piece.len()]);
                    Ok(edges
                        .contains(&index)
                        .then(|| (index, Arc::new(scratch.clone()))))
                },
            )
            .collect::<Result<Vec<_>, SealError>>()?
            .into_iter()
            .flatten()
            .collect();
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        for c in kept {
            if !recent.iter().any(|(j, _)| *j == c.0) {
                recent.push(c);
            }
        }
        let excess = recent.len().saturating_sub(CHUNK_CACHE);
        recent.drain(..excess);
        Ok(())
    }

    /// Tensor names, in file order (the order that decrypts each chunk once).
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut infos: Vec<&TensorInfo> = self.tensors.values().collect();
        infos.sort_by_key(|t| t.offset);
        infos.into_iter().map(|t| t.name.as_str()).collect()
    }
}

impl ModelSource for SealedGguf {
    fn metadata(&self) -> Result<Vec<u8>, ModelError> {
        Ok(self.metadata.to_vec())
    }

    fn metadata_subset(&self, keep: &dyn Fn(&str) -> bool) -> Result<Vec<u8>, ModelError> {
        Ok(cinfer_gguf::write::metadata_of_pairs(
            &self.metadata,
            self.kv_spans
                .iter()
                .filter(|(k, _)| keep(k))
                .map(|(_, s)| s.clone()),
        ))
    }

    fn tensor_shape(&self, name: &str) -> Result<(Vec<u32>, ElemType), ModelError> {
        let t = self.tensors.get(name).ok_or(ModelError::NoSuchTensor)?;
        // GGUF lists dimensions innermost first; tensors here are outermost first.
        let shape = t.dims.iter().rev().map(|d| *d as u32).collect();
        Ok((shape, elem_type(t.ty)))
    }

    fn load_tensor(&self, name: &str, backend: &dyn Backend) -> Result<DeviceBuffer, ModelError> {
        let t = self.tensors.get(name).ok_or(ModelError::NoSuchTensor)?;
        let mut bytes = Zeroizing::new(vec![0u8; t.size as usize]);
        if let Err(e) = self.read_plain(self.data_offset + t.offset, &mut bytes) {
            // The guest only learns `corrupt`; the operator gets which tensor and why.
            tracing::error!(
                model = %self.model_id(),
                tensor = %name,
                error = %e,
                "a sealed model chunk failed; the tensor is refused as corrupt"
            );
            return Err(ModelError::Corrupt);
        }
        let buf = match t.ty {
            GgmlType::F32 => DeviceBuffer::F32(quant::parse_f32(&bytes)),
            GgmlType::F16 => DeviceBuffer::F16(quant::parse_f16(&bytes)),
            GgmlType::Q4_1 => DeviceBuffer::Q4_1(quant::parse_q4_1(&bytes)),
            GgmlType::Q8_0 => DeviceBuffer::Q8_0(quant::parse_q8_0(&bytes)),
        };
        // GGUF dims are innermost first: a matrix is [rows = the rest, cols = dims[0]].
        let cols = t.dims.first().map_or(1, |d| *d as usize);
        let rows = t
            .dims
            .iter()
            .skip(1)
            .map(|d| *d as usize)
            .product::<usize>();
        backend
            .upload_weights(buf, rows, cols)
            .map_err(|_| ModelError::OutOfMemory)
    }
}
