//! One logging set-up for every cinfer binary (the trusted loader, the
//! inference server, the keyserver, `cinfer proxy`):
//!
//! * `CINFER_LOG`: which events, as `tracing` targets: a level (`info`), or
//!   a default and per-crate levels (`warn,cinfer_server=debug`). `RUST_LOG`
//!   is read when `CINFER_LOG` is unset. Unset or unreadable: the binary's
//!   default (an unreadable filter is reported, once, on stderr).
//! * `CINFER_LOG_FORMAT`: `text` (the default: one line per event) or `json`
//!   (one JSON object per line, for log collectors).
//! * Always to stderr. Colour codes only when stderr is a terminal and the
//!   binary was built with the `ansi` feature (the loader is not): never in
//!   files or pipes.
//!
//! Log lines carry names, digests, sizes, outcomes and reasons; never a
//! prompt, a completion or key material (each binary's tests check that).

#![forbid(unsafe_code)]

use std::io::IsTerminal;
pub use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line.
    Json,
}

/// What the environment asks for: the filter, the format, and what could
/// not be read (to report once logging is up).
#[derive(Debug)]
pub struct Settings {
    /// Which events.
    pub filter: Targets,
    /// How they are written.
    pub format: Format,
    /// Variables that were set but unreadable, and why.
    pub problems: Vec<String>,
}

/// Reads the settings from `var` (the environment, or a test's map).
pub fn settings(var: impl Fn(&str) -> Option<String>, default: LevelFilter) -> Settings {
    let mut problems = Vec::new();
    let filter = ["CINFER_LOG", "RUST_LOG"]
        .iter()
        .find_map(|name| var(name).map(|v| (*name, v)))
        .and_then(|(name, v)| match v.parse::<Targets>() {
            Ok(t) => Some(t),
            Err(e) => {
                problems.push(format!("{name}={v:?} ignored ({e}); logging at {default}"));
                None
            }
        })
        .unwrap_or_else(|| Targets::new().with_default(default));
    let format = match var("CINFER_LOG_FORMAT").as_deref() {
        None | Some("text") => Format::Text,
        Some("json") => Format::Json,
        Some(other) => {
            problems.push(format!(
                "CINFER_LOG_FORMAT={other:?} ignored (text or json); writing text"
            ));
            Format::Text
        }
    };
    Settings {
        filter,
        format,
        problems,
    }
}

/// Sets up logging for `binary` from the environment; `default` is the
/// level when nothing (readable) is asked for.
pub fn init(binary: &str, default: LevelFilter) {
    let s = settings(|name| std::env::var(name).ok(), default);
    let text = (s.format == Format::Text).then(|| {
        let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
        // Colour only for a person at a terminal.
        let colour = cfg!(feature = "ansi") && std::io::stderr().is_terminal();
        layer.with_ansi(colour)
    });
    let json = (s.format == Format::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });
    let installed = tracing_subscriber::registry()
        .with(s.filter)
        .with(text)
        .with(json)
        .try_init();
    if installed.is_err() {
        eprintln!("{binary}: logging was already set up");
    }
    for p in s.problems {
        eprintln!("{binary}: {p}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(vars: &[(&str, &str)]) -> Settings {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        settings(|name| vars.get(name).cloned(), LevelFilter::WARN)
    }

    fn shows(s: &Settings, target: &str, level: tracing::Level) -> bool {
        s.filter.would_enable(target, &level)
    }

    #[test]
    fn cinfer_log_wins_over_rust_log_and_the_default() {
        let s = read(&[]);
        assert!(shows(&s, "x", tracing::Level::WARN) && !shows(&s, "x", tracing::Level::INFO));
        assert_eq!(s.format, Format::Text);
        assert!(s.problems.is_empty());
        let s = read(&[("RUST_LOG", "info")]);
        assert!(shows(&s, "x", tracing::Level::INFO));
        let s = read(&[
            ("CINFER_LOG", "error,cinfer_server=debug"),
            ("RUST_LOG", "info"),
        ]);
        assert!(!shows(&s, "x", tracing::Level::WARN));
        assert!(shows(&s, "cinfer_server::http", tracing::Level::DEBUG));
        let s = read(&[("CINFER_LOG_FORMAT", "json")]);
        assert_eq!(s.format, Format::Json);
    }

    #[test]
    fn what_cannot_be_read_is_reported_and_the_default_kept() {
        let s = read(&[("CINFER_LOG", "info,x=loud"), ("CINFER_LOG_FORMAT", "yaml")]);
        assert!(shows(&s, "x", tracing::Level::WARN) && !shows(&s, "x", tracing::Level::INFO));
        assert_eq!(s.format, Format::Text);
        assert_eq!(s.problems.len(), 2, "{:?}", s.problems);
        assert!(
            s.problems[0].starts_with("CINFER_LOG=\"info,x=loud\" ignored"),
            "{:?}",
            s.problems
        );
        assert!(s.problems[1].contains("text or json"), "{:?}", s.problems);
    }
}
