//! `cinfer:loader/crypto`: hands the opened request to the program, once.
//!
//! The HPKE envelope is opened by the loader before the run starts (a
//! tampered request never reaches a program); the private key and the reply
//! keys stay on the host.

use crate::bindings::crypto::{CryptoError, Host};
use zeroize::Zeroizing;

/// The request of one run.
pub struct CryptoCtx {
    request: Option<Zeroizing<Vec<u8>>>,
    len: Option<u64>,
}

impl std::fmt::Debug for CryptoCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CryptoCtx")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl CryptoCtx {
    /// A context holding the opened request (or none).
    pub fn new(request: Option<Zeroizing<Vec<u8>>>) -> Self {
        let len = request.as_ref().map(|r| r.len() as u64);
        CryptoCtx { request, len }
    }
}

impl Host for CryptoCtx {
    fn open_request(&mut self) -> wasmtime::Result<Result<Vec<u8>, CryptoError>> {
        let Some(len) = self.len else {
            return Ok(Err(CryptoError::NoRequest));
        };
        Ok(match self.request.take() {
            // Copied into guest memory by the canonical ABI. The zeroizing
            // original is wiped here; the transient Vec handed to wasmtime is
            // freed by it without wiping (a known gap: no API to hook that).
            Some(req) => {
                debug_assert_eq!(req.len() as u64, len);
                Ok(req.to_vec())
            }
            None => Err(CryptoError::AlreadyOpened),
        })
    }

    fn request_len(&mut self) -> wasmtime::Result<Result<u64, CryptoError>> {
        Ok(self.len.ok_or(CryptoError::NoRequest))
    }
}
