//! Host bindings for the `cinfer:loader/program` world (one `bindgen!` per world).
//!
//! Every import is `trappable`: a host function returns `wasmtime::Result`, and
//! an `Err` is a trap (policy violation or host bug), while guest-visible
//! failures are the WIT `result` error variants.
wasmtime::component::bindgen!({
    path: "../wit",
    world: "program",
    imports: {
        // The launches cross-request batching can coalesce: a run waits for
        // its round as a suspended coroutine (see `crate::driver`).
        "cinfer:loader/accelerator.matmul": async | trappable,
        "cinfer:loader/accelerator.matmul-many": async | trappable,
        "cinfer:loader/accelerator.norm-matmul-many": async | trappable,
        "cinfer:loader/accelerator.matmul-add": async | trappable,
        "cinfer:loader/accelerator.decoder-layer": async | trappable,
        "cinfer:loader/accelerator.decoder-stack": async | trappable,
        // A paced reply frame waits for its egress bytes (`crate::egress`).
        "cinfer:loader/output.emit": async | trappable,
        default: trappable,
    },
    // Runs are driven as futures (`crate::driver`), so `run` is called with
    // `call_async` even where nothing suspends.
    exports: { default: async },
    with: {
        "cinfer:loader/accelerator.tensor": crate::caps::accelerator::Tensor,
        "cinfer:loader/model.sealed-model": crate::caps::model::OpenModel,
    },
});

pub use cinfer::loader::{accelerator, crypto, model, output};
