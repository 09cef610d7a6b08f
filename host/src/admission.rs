//! Admission: which component bytes may run, and with what.
//!
//! Checks, cheapest first, each refusal naming what was wrong:
//! 1. the bytes are a Wasm *component* (not a core module, not something else);
//! 2. the policy lists the component's SHA-256 digest (before any compile, so
//!    unlisted bytes cost a hash, not a compile);
//! 3. the component compiles and validates;
//! 4. every import is an interface of the world the policy grants (by name,
//!    from the component's type: `wasi:*` or a non-granted capability is refused);
//! 5. it links against a [`wasmtime::component::Linker`] holding only the
//!    granted capabilities and no WASI (catches mistyped imports);
//! 6. it exports `run` with the program world's type.

use crate::bindings::ProgramPre;
use crate::loader::RunState;
use crate::policy::{Capabilities, Capability, ProgramGrant};
use sha2::{Digest, Sha256};
use std::fmt;
use wasmtime::component::types::ComponentItem;

/// Why a component was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdmissionError {
    /// The bytes are not WebAssembly at all.
    #[error("not a WebAssembly binary")]
    NotWasm,
    /// The bytes are a core module; programs must be components.
    #[error("a core WebAssembly module, not a component")]
    CoreModule,
    /// The program's grant requires a safety classifier that this loader
    /// has not admitted (admit the classifier first).
    #[error("program `{program}` requires classifier `{classifier}`, which is not admitted")]
    ClassifierNotAdmitted {
        /// The grant.
        program: String,
        /// The classifier's policy entry.
        classifier: String,
    },
    /// The policy does not list this digest.
    #[error("digest sha256:{digest} is not listed in the policy")]
    UnknownDigest {
        /// Hex SHA-256 of the bytes.
        digest: String,
    },
    /// The component came without signatures to a policy that lists no digest
    /// for it but admits programs by signer: it is unsigned, not unknown.
    #[error(
        "program sha256:{digest} is unsigned: its digest is not listed in the policy, which admits programs by signer"
    )]
    Unsigned {
        /// Hex SHA-256 of the bytes.
        digest: String,
    },
    /// The component failed to parse, validate or compile.
    #[error("invalid component: {reason}")]
    InvalidComponent {
        /// The validator's message.
        reason: String,
    },
    /// The component needs more of the instance pool than one run may take
    /// (core instances, memories or tables; [`crate::loader::PER_RUN`]): it
    /// could never instantiate, or would starve every other program.
    #[error("component exceeds one run's share of the instance pool: {reason}")]
    ExceedsRunLimits {
        /// wasmtime's message: what, how many, and the limit.
        reason: String,
    },
    /// The component imports something its world does not grant.
    #[error("import `{import}` is not granted to `{program}` (world `{world}` grants: {granted})")]
    ImportNotGranted {
        /// The offending import name.
        import: String,
        /// The program's policy name.
        program: String,
        /// The world granted.
        world: String,
        /// What the world grants.
        granted: Capabilities,
    },
    /// A granted interface is imported with the wrong type.
    #[error("import does not match the loader's interface: {reason}")]
    ImportMismatch {
        /// The linker's message.
        reason: String,
    },
    /// The program is presented with a signature but the policy names no trust root.
    #[error("the policy has no trust root for signed programs")]
    NoTrustRoot,
    /// The signature bundle was refused (see [`SignatureRefusal`]).
    #[error("signature refused ({refusal:?}): {detail}")]
    Signature {
        /// Why, as a matchable kind.
        refusal: SignatureRefusal,
        /// The verifier's message (names identities and log entries, never bytes).
        detail: String,
    },
    /// The component has no `run` export.
    #[error("missing export `run` (the program world exports `run: func() -> result`)")]
    MissingRun,
    /// `run` exists but has the wrong type.
    #[error("export `run` has the wrong type: {reason}")]
    MistypedRun {
        /// The type checker's message.
        reason: String,
    },
}

/// Why a signature was refused (the kinds of [`cinfer_signing::SigningError`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignatureRefusal {
    /// The bundle does not parse or is not a supported kind.
    Malformed,
    /// No signature in the bundle.
    Unsigned,
    /// The signature does not match the component bytes.
    SignatureMismatch,
    /// The certificate does not chain to a trusted CA.
    UntrustedCa,
    /// The certificate was not valid at the signing time.
    NotValidAtSigningTime,
    /// The certificate is not a code-signing leaf (v3, not a CA, `digitalSignature`,
    /// `codeSigning`) or failed path validation for another reason than its issuer or dates.
    CertificateRefused,
    /// The certificate's SCT does not verify against a trusted CT log.
    SctInvalid,
    /// The signer's identity is not one the policy lists.
    IdentityNotAllowed,
    /// The transparency-log entry, its SET, inclusion proof or checkpoint is invalid.
    TransparencyProofInvalid,
    /// A key-based signature does not verify under any key the policy lists
    /// (for a detached ECDSA signature, other bytes and another key look alike).
    KeySignatureInvalid,
    /// Listed signers signed, but fewer than any grant naming them requires (N of M).
    QuorumNotMet,
    /// Another refusal.
    Other,
}

impl SignatureRefusal {
    /// The kind of a verifier error.
    pub fn of(e: &cinfer_signing::SigningError) -> Self {
        use cinfer_signing::SigningError as E;
        match e {
            E::MalformedBundle(_) | E::MalformedSignature(_) => Self::Malformed,
            E::Unsigned => Self::Unsigned,
            E::SignatureMismatch => Self::SignatureMismatch,
            E::UntrustedCa => Self::UntrustedCa,
            E::CertificateNotValidAtSigningTime { .. } => Self::NotValidAtSigningTime,
            E::CertificateRefused(_) => Self::CertificateRefused,
            E::SctInvalid => Self::SctInvalid,
            E::IdentityNotAllowed { .. } => Self::IdentityNotAllowed,
            E::TransparencyProofInvalid(_) => Self::TransparencyProofInvalid,
            E::KeySignatureInvalid => Self::KeySignatureInvalid,
            E::KeyNotTrusted { .. } => Self::IdentityNotAllowed,
            _ => Self::Other,
        }
    }
}

/// A component that passed admission: compiled, linked and ready to
/// instantiate in microseconds.
pub struct AdmittedProgram {
    pub(crate) grant: ProgramGrant,
    pub(crate) signatures: Vec<crate::signatures::VerifiedSignature>,
    pub(crate) pre: ProgramPre<RunState>,
    pub(crate) imports: Vec<String>,
}

impl fmt::Debug for AdmittedProgram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdmittedProgram")
            .field("name", &self.grant.name)
            .field("digest", &hex::encode(self.grant.digest))
            .field("world", &self.grant.world)
            .finish_non_exhaustive()
    }
}

impl AdmittedProgram {
    /// The policy entry that admitted it.
    pub fn grant(&self) -> &ProgramGrant {
        &self.grant
    }

    /// The signatures that earned a signed admission: who signed, when and
    /// where it is logged (empty for admission by digest).
    pub fn signatures(&self) -> &[crate::signatures::VerifiedSignature] {
        &self.signatures
    }

    /// The interfaces the component actually imports.
    pub fn imports(&self) -> &[String] {
        &self.imports
    }
}

/// The Wasm preamble: magic, then a version/layer word.
const MAGIC: &[u8; 4] = b"\0asm";
const CORE_VERSION: [u8; 4] = [1, 0, 0, 0];
const COMPONENT_LAYER: [u8; 2] = [1, 0];

/// Step 1: what kind of binary this is.
pub fn check_preamble(bytes: &[u8]) -> Result<(), AdmissionError> {
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        return Err(AdmissionError::NotWasm);
    }
    if bytes[4..8] == CORE_VERSION {
        return Err(AdmissionError::CoreModule);
    }
    if bytes[6..8] != COMPONENT_LAYER {
        return Err(AdmissionError::NotWasm);
    }
    Ok(())
}

/// SHA-256 of component bytes.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn item_kind(ty: &ComponentItem) -> &'static str {
    match ty {
        ComponentItem::ComponentFunc(_) => "a function",
        ComponentItem::CoreFunc(_) => "a core function",
        ComponentItem::Module(_) => "a core module",
        ComponentItem::Component(_) => "a component",
        ComponentItem::ComponentInstance(_) => "an instance",
        ComponentItem::Type(_) => "a type",
        ComponentItem::Resource(_) => "a resource",
    }
}

/// Step 4: every import must be a granted capability interface.
pub(crate) fn check_imports(
    engine: &wasmtime::Engine,
    component: &wasmtime::component::Component,
    grant: &ProgramGrant,
) -> Result<Vec<String>, AdmissionError> {
    let ty = component.component_type();
    let mut names = Vec::new();
    for (name, item) in ty.imports(engine) {
        let capability = Capability::from_interface(name);
        let granted = capability.is_some_and(|c| grant.capabilities.contains(c));
        // A granted interface's name on something other than an instance of
        // it (a bare function, a type): the import is granted, its shape wrong.
        if granted && !matches!(item.ty, ComponentItem::ComponentInstance(_)) {
            return Err(AdmissionError::ImportMismatch {
                reason: format!(
                    "`{name}` is imported as {}, not as an instance of the interface",
                    item_kind(&item.ty)
                ),
            });
        }
        if !granted {
            return Err(AdmissionError::ImportNotGranted {
                import: name.to_owned(),
                program: grant.name.clone(),
                world: grant.world.clone(),
                granted: grant.capabilities,
            });
        }
        names.push(name.to_owned());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preamble_kinds() {
        assert_eq!(check_preamble(b""), Err(AdmissionError::NotWasm));
        assert_eq!(
            check_preamble(b"hello world!"),
            Err(AdmissionError::NotWasm)
        );
        assert_eq!(
            check_preamble(b"\0asm\x01\0\0\0"),
            Err(AdmissionError::CoreModule)
        );
        assert_eq!(check_preamble(b"\0asm\x0d\0\x01\0"), Ok(()));
        assert_eq!(
            check_preamble(b"\0asm\x0d\0\x07\0"),
            Err(AdmissionError::NotWasm)
        );
    }
}
