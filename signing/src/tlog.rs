//! Transparency-log checks that sigstore-rs 0.15 leaves out (its issue 285): the signed entry
//! timestamp, the Merkle inclusion proof, the checkpoint, and `logIndex` consistency.
//!
//! What is sigstore-rs and what is hand-written here:
//! - inclusion proof + checkpoint: sigstore-rs's [`InclusionProof::verify`] (checkpoint
//!   signature under the Rekor key, checkpoint root hash and tree size equal to the proof's,
//!   RFC 6962 Merkle path from the leaf hash to the root). We call it on the bundle's raw
//!   `canonicalizedBody` rather than through `LogEntry::verify_inclusion`, which re-serialises a
//!   parsed body (and knows only Rekor's API shape, not the bundle's): the leaf hash must be over
//!   the exact bytes that were logged.
//! - SET: sigstore-rs has no function for it, so it is written here: the Rekor key's signature
//!   over the RFC 8785 canonical JSON of `{body, integratedTime, logID, logIndex}` (body as
//!   base64, logID as hex), verified with [`CosignVerificationKey`].
//! - `inclusionProof.logIndex <= logIndex`, the log's `validFor` window at `integratedTime`, and
//!   the checkpoint key hint: written here, a few lines each.
//!
//! # Sharded logs
//!
//! Public Rekor v1 is sharded: `logIndex` is the entry's *global* index (the shard's offset plus
//! its index in the shard) and is what the SET signs; `inclusionProof.logIndex` is its index in
//! the shard's Merkle tree, which the inclusion proof and the signed checkpoint authenticate. The
//! two are equal only in the first shard, and the shard offsets are not in the trust root, so
//! the only relation that can be checked offline is `inclusionProof.logIndex <= logIndex`
//! (sigstore-python and sigstore-js check no more). Each index is authenticated on its own: the
//! global one by the SET, the shard-local one by the Merkle path to the signed root.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use sigstore::crypto::{CosignVerificationKey, Signature};
use sigstore::errors::SigstoreError;
use sigstore::rekor::models::InclusionProof;
use sigstore::rekor::models::log_entry::RekorInclusionProof;
use sigstore_protobuf_specs::dev::sigstore::rekor::v1::TransparencyLogEntry;

use crate::error::TransparencyError as T;
use crate::trust::TrustRoot;

/// A log entry whose SET, inclusion proof and checkpoint verified under a trusted log key.
#[derive(Debug, Clone)]
pub(crate) struct CheckedEntry {
    pub(crate) integrated_time: i64,
    pub(crate) log_index: i64,
    pub(crate) log_id: Vec<u8>,
    pub(crate) log_url: String,
}

/// Checks one entry against the trust root. Order: trusted log, SET (this authenticates
/// `integratedTime`, `logIndex`, `logID` and the body), log key validity at `integratedTime`,
/// index consistency, checkpoint + inclusion proof.
pub(crate) fn check_entry(
    entry: &TransparencyLogEntry,
    trust: &TrustRoot,
) -> Result<CheckedEntry, T> {
    let log_id = entry
        .log_id
        .as_ref()
        .map(|id| id.key_id.as_slice())
        .filter(|id| !id.is_empty())
        .ok_or_else(|| T::Malformed("logId".to_owned()))?;
    let log = trust.tlog(log_id).ok_or_else(|| T::UntrustedLog {
        log_id: hex::encode(log_id),
    })?;
    let key = CosignVerificationKey::try_from_der(&log.spki).map_err(|_| T::UntrustedLog {
        log_id: hex::encode(log_id),
    })?;
    if entry.canonicalized_body.is_empty() {
        return Err(T::Malformed("canonicalizedBody".to_owned()));
    }
    if entry.log_index < 0 || entry.integrated_time <= 0 {
        return Err(T::Malformed("logIndex / integratedTime".to_owned()));
    }

    // Signed entry timestamp (hand-written: no sigstore-rs primitive).
    let set = entry
        .inclusion_promise
        .as_ref()
        .map(|p| p.signed_entry_timestamp.as_slice())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| T::Malformed("inclusionPromise (SET)".to_owned()))?;
    let payload = serde_json::json!({
        "body": B64.encode(&entry.canonicalized_body),
        "integratedTime": entry.integrated_time,
        "logID": hex::encode(log_id),
        "logIndex": entry.log_index,
    });
    let payload = serde_json_canonicalizer::to_vec(&payload)
        .map_err(|_| T::Malformed("SET payload".to_owned()))?;
    key.verify_signature(Signature::Raw(set), &payload)
        .map_err(|_| T::SignedEntryTimestamp)?;

    if !log.valid_for.contains(entry.integrated_time) {
        return Err(T::LogNotValidAtSigningTime(entry.integrated_time));
    }

    let proof = entry
        .inclusion_proof
        .as_ref()
        .ok_or_else(|| T::Malformed("inclusionProof".to_owned()))?;
    // Shard-local index ≤ global index (see "Sharded logs" above); equal on an unsharded log.
    if proof.log_index < 0 || proof.log_index > entry.log_index {
        return Err(T::LogIndexMismatch {
            entry: entry.log_index,
            proof: proof.log_index,
        });
    }
    let checkpoint = proof
        .checkpoint
        .as_ref()
        .map(|c| c.envelope.as_str())
        .filter(|c| !c.is_empty())
        .ok_or_else(|| T::Malformed("inclusionProof.checkpoint".to_owned()))?;
    let tree_size = u64::try_from(proof.tree_size)
        .map_err(|_| T::Malformed("inclusionProof.treeSize".to_owned()))?;
    let api = RekorInclusionProof {
        hashes: proof.hashes.iter().map(hex::encode).collect(),
        log_index: proof.log_index,
        root_hash: hex::encode(&proof.root_hash),
        tree_size,
        checkpoint: checkpoint.to_owned(),
    };
    let parsed =
        InclusionProof::try_from(&api).map_err(|e| T::Malformed(format!("inclusionProof: {e}")))?;
    // The checkpoint must carry a signature whose key hint is this log's (first 4 bytes of the
    // log ID, as Rekor writes it); the signature itself is checked below by sigstore-rs.
    let signed = parsed
        .checkpoint
        .as_ref()
        .ok_or_else(|| T::Malformed("inclusionProof.checkpoint".to_owned()))?;
    if !signed
        .signatures
        .iter()
        .any(|s| log_id.get(..4) == Some(&s.key_fingerprint[..]))
    {
        return Err(T::CheckpointSignature);
    }
    parsed
        .verify(&entry.canonicalized_body, &key)
        .map_err(|e| match e {
            SigstoreError::CheckpointSignatureVerificationError => T::CheckpointSignature,
            SigstoreError::ConsistencyProofError(_) => T::CheckpointMismatch,
            SigstoreError::InclusionProofError(_) => T::InclusionProof,
            other => T::Malformed(format!("inclusionProof: {other}")),
        })?;

    Ok(CheckedEntry {
        integrated_time: entry.integrated_time,
        log_index: entry.log_index,
        log_id: log_id.to_vec(),
        log_url: log.base_url.clone(),
    })
}
