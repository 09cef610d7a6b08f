//! The admission verdict as people read it (`cinfer verify`).

use crate::Loader;
use std::fmt::Write as _;

/// Admits `bytes` (by digest when `signatures` is empty, else by who signed)
/// and describes the verdict: who signed, when, which log entry, what is
/// granted. Returns whether the program was admitted, and the text.
pub fn admission(loader: &Loader, bytes: &[u8], signatures: &[&[u8]]) -> (bool, String) {
    let mut out = String::new();
    let verdict = if signatures.is_empty() {
        loader.admit(bytes)
    } else {
        loader.admit_signatures(bytes, signatures)
    };
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "sha256:   {}",
        hex::encode(crate::admission::digest(bytes))
    );
    let p = match verdict {
        Ok(p) => p,
        Err(e) => {
            let _ = writeln!(out, "verdict:  REFUSED: {e}");
            return (false, out);
        }
    };
    for s in p.signatures() {
        let _ = writeln!(out, "signer:   `{}`: {}", s.signer, s.identity);
        match &s.log {
            Some(l) => {
                let _ = writeln!(
                    out,
                    "  signed: {} (Unix seconds, the log's integratedTime)",
                    l.integrated_time
                );
                let _ = writeln!(
                    out,
                    "  log:    entry {} of {} (log id {})",
                    l.log_index, l.log_url, l.log_id
                );
            }
            None => {
                let _ = writeln!(out, "  log:    none (detached key signature)");
            }
        }
    }
    let g = p.grant();
    let _ = writeln!(
        out,
        "verdict:  ADMITTED as `{}` in world `{}`",
        g.name, g.world
    );
    let _ = writeln!(out, "granted:  {}", g.capabilities);
    let _ = writeln!(
        out,
        "imports:  {}",
        if p.imports().is_empty() {
            "(none)".to_owned()
        } else {
            p.imports().join(", ")
        }
    );
    let _ = writeln!(
        out,
        "limits:   memory {} B, deadline {} ms, egress {} B, accelerator {} B, request {} B, host call {} B",
        g.limits.memory_bytes,
        g.limits.deadline.as_millis(),
        g.limits.egress_bytes,
        g.limits.accelerator_bytes,
        g.limits.request_bytes,
        g.limits.hostcall_bytes
    );
    if !g.models.is_empty() {
        let _ = writeln!(out, "models:   {}", g.models.join(", "));
    }
    if let Some(r) = g.limits.egress_rate {
        let _ = writeln!(
            out,
            "egress:   {} B/s, bursts of {} B (all runs of this grant together)",
            r.bytes_per_sec, r.burst_bytes
        );
    }
    if let Some(c) = &g.classifier {
        let _ = writeln!(
            out,
            "gated by: classifier `{}` (sha256 {}): runs only on requests it allows",
            c.name,
            hex::encode(c.digest)
        );
    }
    (true, out)
}
