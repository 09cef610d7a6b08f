//! Host bindings for the `cinfer:loader/program` world (one `bindgen!` per world).
//!
//! Every import is `trappable`: a host function returns `wasmtime::Result`, and
//! an `Err` is a trap (policy violation or host bug), while guest-visible
//! failures are the WIT `result` error variants.
wasmtime::component::bindgen!({
    path: "../wit",
    world: "program",
    imports: { default: trappable },
    with: {
        "cinfer:loader/accelerator.tensor": crate::caps::accelerator::Tensor,
        "cinfer:loader/model.sealed-model": crate::caps::model::OpenModel,
    },
});

pub use cinfer::loader::{accelerator, crypto, model, output};
