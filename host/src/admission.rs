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
    /// The policy does not list this digest.
    #[error("digest sha256:{digest} is not listed in the policy")]
    UnknownDigest {
        /// Hex SHA-256 of the bytes.
        digest: String,
    },
    /// The component failed to parse, validate or compile.
    #[error("invalid component: {reason}")]
    InvalidComponent {
        /// The validator's message.
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

/// A component that passed admission: compiled, linked and ready to
/// instantiate in microseconds.
pub struct AdmittedProgram {
    pub(crate) grant: ProgramGrant,
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

/// Step 4: every import must be a granted capability interface.
pub(crate) fn check_imports(
    engine: &wasmtime::Engine,
    component: &wasmtime::component::Component,
    grant: &ProgramGrant,
) -> Result<Vec<String>, AdmissionError> {
    let ty = component.component_type();
    let mut names = Vec::new();
    for (name, item) in ty.imports(engine) {
        let granted = matches!(item.ty, ComponentItem::ComponentInstance(_))
            && Capability::from_interface(name).is_some_and(|c| grant.capabilities.contains(c));
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
