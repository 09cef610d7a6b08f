//! Extract: the TPM's marshalled structures → typed values.
//!
//! A bounded parser for big-endian TPM marshalling (TPM 2.0 Part 2): every length
//! is checked against what is left and against the structure's maximum, trailing
//! bytes are refused, and no input makes it panic.

use super::EvidenceError;
use std::collections::BTreeSet;

/// `TPM_GENERATED_VALUE`: the magic the TPM puts at the start of everything it signs.
pub const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
/// `TPM_ST_ATTEST_QUOTE`: the `TPMS_ATTEST` type of a quote.
pub const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;
/// `TPM_ALG_ECDSA`.
pub const TPM_ALG_ECDSA: u16 = 0x0018;
/// `TPM_ALG_SHA256`.
pub const TPM_ALG_SHA256: u16 = 0x000b;

/// `sizeof(TPMU_NAME)`: a `TPMT_HA` with the largest digest (SHA-512).
const MAX_NAME_LEN: usize = 2 + 64;
/// `sizeof(TPMT_HA)`, the buffer size of `TPM2B_DATA`.
const MAX_DATA_LEN: usize = 2 + 64;
/// Largest digest (SHA-512).
const MAX_DIGEST_LEN: usize = 64;
/// More PCR banks than any TPM implements.
const MAX_BANKS: u32 = 16;
/// `PCR_SELECT_MAX` for up to 32 PCRs.
const MAX_SIZEOF_SELECT: usize = 4;
/// An ECDSA P-256 scalar.
const SCALAR_LEN: usize = 32;

/// `TPMS_CLOCK_INFO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockInfo {
    /// Milliseconds the TPM has been powered since it was made.
    pub clock: u64,
    /// TPM resets (power cycles) so far.
    pub reset_count: u32,
    /// TPM restarts (resume from suspend) since the last reset.
    pub restart_count: u32,
    /// Whether `clock` has never gone backwards.
    pub safe: bool,
}

/// One `TPMS_PCR_SELECTION`: a bank and a PCR bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcrSelection {
    /// The bank's hash algorithm (`TPM_ALG_ID`).
    pub hash_alg: u16,
    /// `pcrSelect`: PCR `i` is bit `i % 8` of byte `i / 8`.
    pub bitmap: Vec<u8>,
}

impl PcrSelection {
    /// A SHA-256 bank selection of `pcrs` (each below 32), with the usual 3-byte
    /// bitmap for PCRs 0..=23.
    pub fn sha256(pcrs: impl IntoIterator<Item = u8>) -> Self {
        let mut bitmap = vec![0u8; 3];
        for pcr in pcrs {
            let byte = usize::from(pcr / 8);
            if byte >= bitmap.len() {
                bitmap.resize(byte + 1, 0);
            }
            bitmap[byte] |= 1 << (pcr % 8);
        }
        Self {
            hash_alg: TPM_ALG_SHA256,
            bitmap,
        }
    }

    /// The selected PCR indices.
    pub fn indices(&self) -> BTreeSet<u8> {
        let mut out = BTreeSet::new();
        for (byte_index, byte) in (0u8..).zip(&self.bitmap) {
            for bit in 0..8u8 {
                if byte & (1 << bit) != 0 {
                    out.insert(byte_index * 8 + bit);
                }
            }
        }
        out
    }
}

/// A parsed `TPMS_ATTEST` of type `TPM_ST_ATTEST_QUOTE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    /// `qualifiedSigner` (`TPM2B_NAME`): the AK's qualified name. Not checked:
    /// the AK is pinned by its public key instead.
    pub qualified_signer: Vec<u8>,
    /// `extraData` (`TPM2B_DATA`): the caller's qualifying data, here
    /// [`crate::binding`]`(nonce, hpke public key)`.
    pub extra_data: Vec<u8>,
    /// `clockInfo`.
    pub clock_info: ClockInfo,
    /// `firmwareVersion`.
    pub firmware_version: u64,
    /// `TPMS_QUOTE_INFO.pcrSelect`.
    pub pcr_selections: Vec<PcrSelection>,
    /// `TPMS_QUOTE_INFO.pcrDigest`.
    pub pcr_digest: Vec<u8>,
}

impl Quote {
    /// Parses the marshalled `TPMS_ATTEST` (the contents of a `TPM2B_ATTEST`).
    pub fn parse(bytes: &[u8]) -> Result<Self, EvidenceError> {
        let mut r = Reader::new(bytes);
        let magic = r.u32("attest magic")?;
        if magic != TPM_GENERATED_VALUE {
            return Err(EvidenceError::WrongMagic(magic));
        }
        let kind = r.u16("attest type")?;
        if kind != TPM_ST_ATTEST_QUOTE {
            return Err(EvidenceError::NotAQuote(kind));
        }
        let qualified_signer = r.tpm2b(MAX_NAME_LEN, "qualifiedSigner")?.to_vec();
        let extra_data = r.tpm2b(MAX_DATA_LEN, "extraData")?.to_vec();
        let clock = r.u64("clockInfo.clock")?;
        let reset_count = r.u32("clockInfo.resetCount")?;
        let restart_count = r.u32("clockInfo.restartCount")?;
        let safe = match r.u8("clockInfo.safe")? {
            0 => false,
            1 => true,
            _ => return Err(malformed("clockInfo.safe is not a TPMI_YES_NO")),
        };
        let firmware_version = r.u64("firmwareVersion")?;
        let count = r.u32("pcrSelect.count")?;
        if count > MAX_BANKS {
            return Err(malformed("pcrSelect.count too large"));
        }
        let mut pcr_selections = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let hash_alg = r.u16("pcrSelections.hash")?;
            let size = usize::from(r.u8("pcrSelections.sizeofSelect")?);
            if size > MAX_SIZEOF_SELECT {
                return Err(malformed("pcrSelections.sizeofSelect too large"));
            }
            let bitmap = r.take(size, "pcrSelections.pcrSelect")?.to_vec();
            pcr_selections.push(PcrSelection { hash_alg, bitmap });
        }
        let pcr_digest = r.tpm2b(MAX_DIGEST_LEN, "pcrDigest")?.to_vec();
        r.finish("trailing bytes after TPMS_ATTEST")?;
        Ok(Self {
            qualified_signer,
            extra_data,
            clock_info: ClockInfo {
                clock,
                reset_count,
                restart_count,
                safe,
            },
            firmware_version,
            pcr_selections,
            pcr_digest,
        })
    }

    /// Marshals the quote as the TPM does (what [`Quote::parse`] reads).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(&TPM_GENERATED_VALUE.to_be_bytes());
        out.extend_from_slice(&TPM_ST_ATTEST_QUOTE.to_be_bytes());
        put_tpm2b(&mut out, &self.qualified_signer);
        put_tpm2b(&mut out, &self.extra_data);
        out.extend_from_slice(&self.clock_info.clock.to_be_bytes());
        out.extend_from_slice(&self.clock_info.reset_count.to_be_bytes());
        out.extend_from_slice(&self.clock_info.restart_count.to_be_bytes());
        out.push(u8::from(self.clock_info.safe));
        out.extend_from_slice(&self.firmware_version.to_be_bytes());
        out.extend_from_slice(&(self.pcr_selections.len() as u32).to_be_bytes());
        for sel in &self.pcr_selections {
            out.extend_from_slice(&sel.hash_alg.to_be_bytes());
            out.push(sel.bitmap.len() as u8);
            out.extend_from_slice(&sel.bitmap);
        }
        put_tpm2b(&mut out, &self.pcr_digest);
        out
    }
}

/// A parsed `TPMT_SIGNATURE` with scheme ECDSA and hash SHA-256: the scalars
/// `r` and `s`, left-padded to 32 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcdsaSignature {
    /// `signatureR`.
    pub r: [u8; SCALAR_LEN],
    /// `signatureS`.
    pub s: [u8; SCALAR_LEN],
}

impl EcdsaSignature {
    /// Parses a marshalled `TPMT_SIGNATURE`; anything but ECDSA with SHA-256 is
    /// [`EvidenceError::UnsupportedSignature`].
    pub fn parse(bytes: &[u8]) -> Result<Self, EvidenceError> {
        let mut r = Reader::new(bytes);
        let sig_alg = r.u16("sigAlg")?;
        // The hash is part of TPMS_SIGNATURE_ECDSA; read it before judging the
        // scheme so the error names both.
        let hash = r.u16("signature hash")?;
        if sig_alg != TPM_ALG_ECDSA || hash != TPM_ALG_SHA256 {
            return Err(EvidenceError::UnsupportedSignature { sig_alg, hash });
        }
        let sig_r = left_pad(r.tpm2b(SCALAR_LEN, "signatureR")?, "signatureR")?;
        let sig_s = left_pad(r.tpm2b(SCALAR_LEN, "signatureS")?, "signatureS")?;
        r.finish("trailing bytes after TPMT_SIGNATURE")?;
        Ok(Self { r: sig_r, s: sig_s })
    }

    /// Marshals as a `TPMT_SIGNATURE`, with `r` and `s` stripped of leading zero
    /// bytes as some TPMs do (the parser must left-pad them).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(72);
        out.extend_from_slice(&TPM_ALG_ECDSA.to_be_bytes());
        out.extend_from_slice(&TPM_ALG_SHA256.to_be_bytes());
        for scalar in [&self.r, &self.s] {
            let start = scalar
                .iter()
                .position(|b| *b != 0)
                .unwrap_or(SCALAR_LEN - 1);
            put_tpm2b(&mut out, &scalar[start..]);
        }
        out
    }
}

fn left_pad(bytes: &[u8], what: &'static str) -> Result<[u8; SCALAR_LEN], EvidenceError> {
    if bytes.is_empty() {
        return Err(EvidenceError::Malformed { what });
    }
    let mut out = [0u8; SCALAR_LEN];
    out[SCALAR_LEN - bytes.len()..].copy_from_slice(bytes);
    Ok(out)
}

fn put_tpm2b(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn malformed(what: &'static str) -> EvidenceError {
    EvidenceError::Malformed { what }
}

/// A cursor over untrusted bytes; every read is bounds-checked.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], EvidenceError> {
        if self.rest.len() < n {
            return Err(EvidenceError::Malformed { what });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], EvidenceError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, EvidenceError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, EvidenceError> {
        self.array(what).map(u16::from_be_bytes)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, EvidenceError> {
        self.array(what).map(u32::from_be_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, EvidenceError> {
        self.array(what).map(u64::from_be_bytes)
    }

    /// A `TPM2B_*`: a u16 size, then that many bytes (at most `max`).
    fn tpm2b(&mut self, max: usize, what: &'static str) -> Result<&'a [u8], EvidenceError> {
        let size = usize::from(self.u16(what)?);
        if size > max {
            return Err(EvidenceError::Malformed { what });
        }
        self.take(size, what)
    }

    fn finish(self, what: &'static str) -> Result<(), EvidenceError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(EvidenceError::Malformed { what })
        }
    }
}
