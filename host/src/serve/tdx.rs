//! Intel TDX evidence from inside a TD guest, through Linux's file
//! interfaces only (no ioctl, no `unsafe`):
//!
//! - **RTMR extension** (Linux ≥ 6.16, `tsm-mr`): writing 48 bytes to
//!   `<measurements-dir>/rtmr<N>:sha384` extends RTMR N
//!   (`TDG.MR.RTMR.EXTEND`: `rtmr := SHA-384(rtmr || value)`). At start the
//!   loader extends [`cinfer_attest::rtmr_event_value`] of every event of its
//!   log into one RTMR (3 by default), in log order, so that a keyserver can
//!   replay the same log it replays into the TPM's PCR.
//! - **TD quotes** (configfs-tsm, `Documentation/ABI/testing/configfs-tsm`):
//!   `mkdir <report-dir>/<entry>`, write the 64-byte report data to `inblob`,
//!   read the quote from `outblob`, then check that `generation` is 1 (no
//!   other writer touched the entry between the write and the read).
//!
//! An RTMR cannot be reset: it is zero at TD start and every extend stays.
//! The loader therefore expects to be the only software extending its RTMR
//! in a TD's life; a second loader start in the same TD gives evidence whose
//! RTMR does not replay from the log, which keyservers refuse
//! (`EventLogReplay`). Restart the TD to restart the loader.
//!
//! The test provider (`cinfer tdx-test-provider`) plays both interfaces in a
//! directory: the RTMR file is a FIFO it reads extends from, and it answers a
//! report entry's `inblob` by writing `outblob`, then `generation`; the
//! loader waits for `generation` before reading, which the kernel's configfs
//! answers at once.

use serde::Deserialize;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The `[tdx]` table of the serve configuration: where the TD's quote
/// provider and measurement registers are. Measured with the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TdxConfig {
    /// configfs-tsm report directory.
    #[serde(default = "default_report_dir")]
    pub report_dir: PathBuf,
    /// The TDX guest driver's measurement registers.
    #[serde(default = "default_measurements_dir")]
    pub measurements_dir: PathBuf,
    /// The RTMR the event log is extended into: 2 or 3 (the ones Linux lets
    /// software extend; 0 and 1 hold the firmware's and the kernel's
    /// measurements).
    #[serde(default = "default_rtmr")]
    pub rtmr: u8,
    /// How long a quote may take, milliseconds.
    #[serde(default = "default_quote_timeout_ms")]
    pub quote_timeout_ms: u64,
}

fn default_report_dir() -> PathBuf {
    PathBuf::from("/sys/kernel/config/tsm/report")
}

fn default_measurements_dir() -> PathBuf {
    PathBuf::from("/sys/class/misc/tdx_guest/measurements")
}

fn default_rtmr() -> u8 {
    cinfer_attest::TDX_EVENT_RTMR
}

fn default_quote_timeout_ms() -> u64 {
    10_000
}

/// Why TDX evidence could not be produced. Names paths, never contents.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TdxError {
    /// The configured RTMR is not one software may extend.
    #[error("tdx.rtmr = {0}: only RTMR2 and RTMR3 can be extended by software")]
    BadRtmr(u8),
    /// A file of the TD's interfaces could not be used.
    #[error("{action} {path}: {error}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's reason.
        error: std::io::Error,
    },
    /// The quote provider gave no quote in time.
    #[error("no TD quote from {path} within {timeout_ms} ms")]
    Timeout {
        /// The report entry.
        path: PathBuf,
        /// The configured timeout.
        timeout_ms: u64,
    },
    /// Another writer used the report entry while this quote was made.
    #[error("the report entry {path} was written by someone else (generation {generation})")]
    Raced {
        /// The report entry.
        path: PathBuf,
        /// Its generation counter (1 for this loader's one write).
        generation: String,
    },
    /// The provider answered with an empty quote.
    #[error("the quote provider returned an empty quote ({path})")]
    EmptyQuote {
        /// The report entry.
        path: PathBuf,
    },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TdxError + 'a {
    move |error| TdxError::Io {
        action,
        path: path.to_owned(),
        error,
    }
}

/// A TD's quote provider, its event RTMR extended with the event log.
#[derive(Debug)]
pub struct TdxQuoter {
    config: TdxConfig,
    next_entry: u64,
}

impl TdxQuoter {
    /// Extends every event of `events` into the configured RTMR, in order.
    pub fn extend(config: TdxConfig, events: &[cinfer_attest::Event]) -> Result<Self, TdxError> {
        if !(2..=3).contains(&config.rtmr) {
            return Err(TdxError::BadRtmr(config.rtmr));
        }
        let path = config
            .measurements_dir
            .join(format!("rtmr{}:sha384", config.rtmr));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io("opening", &path))?;
        for event in events {
            // One write of exactly 48 bytes: one extend.
            let value = cinfer_attest::rtmr_event_value(event);
            let written = file.write(&value).map_err(io("extending", &path))?;
            if written != value.len() {
                return Err(io("extending", &path)(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    format!("{written} of 48 bytes written"),
                )));
            }
        }
        Ok(Self {
            config,
            next_entry: 0,
        })
    }

    /// The RTMR the events were extended into.
    pub fn rtmr(&self) -> u8 {
        self.config.rtmr
    }

    /// A TD quote whose report data is `report_data`.
    pub fn quote(&mut self, report_data: &[u8; 64]) -> Result<Vec<u8>, TdxError> {
        let entry = self.config.report_dir.join(format!(
            "cinfer-{}-{}",
            std::process::id(),
            self.next_entry
        ));
        self.next_entry += 1;
        std::fs::create_dir(&entry).map_err(io("creating the report entry", &entry))?;
        let result = self.quote_in(&entry, report_data);
        // configfs removes an entry with rmdir; a directory the test
        // provider filled stays (it is in a temporary directory).
        let _ = std::fs::remove_dir(&entry);
        result
    }

    fn quote_in(&self, entry: &Path, report_data: &[u8; 64]) -> Result<Vec<u8>, TdxError> {
        let inblob = entry.join("inblob");
        std::fs::write(&inblob, report_data).map_err(io("writing", &inblob))?;
        let generation = entry.join("generation");
        let timeout_ms = self.config.quote_timeout_ms;
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        // configfs answers at once; the test provider after its quote is written.
        loop {
            match std::fs::read_to_string(&generation) {
                Ok(g) if !g.trim().is_empty() => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("reading", &generation)(e)),
            }
            if Instant::now() >= deadline {
                return Err(TdxError::Timeout {
                    path: entry.to_owned(),
                    timeout_ms,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let outblob = entry.join("outblob");
        let quote = std::fs::read(&outblob).map_err(io("reading", &outblob))?;
        let after = std::fs::read_to_string(&generation).map_err(io("reading", &generation))?;
        if after.trim() != "1" {
            return Err(TdxError::Raced {
                path: entry.to_owned(),
                generation: after.trim().chars().take(20).collect(),
            });
        }
        if quote.is_empty() {
            return Err(TdxError::EmptyQuote {
                path: entry.to_owned(),
            });
        }
        Ok(quote)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cinfer_attest::{Event, EventKind};

    /// A fresh directory with `report/` and `measurements/` (the provider's
    /// answers are played by each test by hand).
    fn dirs(name: &str) -> (PathBuf, TdxConfig) {
        let dir = std::env::temp_dir().join(format!("cinfer-tdx-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("report")).unwrap();
        std::fs::create_dir_all(dir.join("measurements")).unwrap();
        let config = TdxConfig {
            report_dir: dir.join("report"),
            measurements_dir: dir.join("measurements"),
            rtmr: 3,
            quote_timeout_ms: 200,
        };
        (dir, config)
    }

    fn events() -> Vec<Event> {
        vec![
            Event::measure(23, EventKind::LoaderBinary, "l", b"bin"),
            Event::measure(23, EventKind::Config, "c", b"cfg"),
        ]
    }

    #[test]
    fn extends_write_one_48_byte_value_per_event_in_log_order() {
        let (dir, config) = dirs("extend");
        // A plain file stands in for the attribute: the writes land one
        // after the other, where the kernel extends the RTMR with each.
        let rtmr = dir.join("measurements/rtmr3:sha384");
        std::fs::write(&rtmr, b"").unwrap();
        let log = events();
        TdxQuoter::extend(config, &log).unwrap();
        let expected: Vec<u8> = log
            .iter()
            .flat_map(cinfer_attest::rtmr_event_value)
            .collect();
        assert_eq!(std::fs::read(&rtmr).unwrap(), expected);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_rtmr2_and_rtmr3_can_be_configured_and_a_missing_register_is_named() {
        let (dir, mut config) = dirs("rtmr");
        config.rtmr = 1;
        assert!(matches!(
            TdxQuoter::extend(config.clone(), &events()),
            Err(TdxError::BadRtmr(1))
        ));
        config.rtmr = 3;
        let err = TdxQuoter::extend(config, &events()).unwrap_err();
        assert!(
            matches!(&err, TdxError::Io { action: "opening", path, .. } if path.ends_with("rtmr3:sha384")),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_quote_is_read_after_generation_and_refused_when_raced_empty_or_late() {
        let (dir, config) = dirs("quote");
        std::fs::write(dir.join("measurements/rtmr3:sha384"), b"").unwrap();
        let mut q = TdxQuoter::extend(config, &events()).unwrap();
        let report = dir.join("report");
        // A provider thread answering the next entry as `answer` says.
        let serve = |answer: &'static [(&'static str, &'static [u8])]| {
            let report = report.clone();
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline {
                    for e in std::fs::read_dir(&report).unwrap() {
                        let e = e.unwrap().path();
                        if e.join("inblob").exists() && !e.join("generation").exists() {
                            for (name, bytes) in answer {
                                std::fs::write(e.join(name), bytes).unwrap();
                            }
                            return std::fs::read(e.join("inblob")).unwrap();
                        }
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Vec::new()
            })
        };
        let provider = serve(&[("outblob", b"quote bytes"), ("generation", b"1\n")]);
        assert_eq!(q.quote(&[7; 64]).unwrap(), b"quote bytes");
        assert_eq!(provider.join().unwrap(), [7; 64], "the report data went in");

        let provider = serve(&[("outblob", b"quote"), ("generation", b"2\n")]);
        let err = q.quote(&[7; 64]).unwrap_err();
        assert!(
            matches!(&err, TdxError::Raced { generation, .. } if generation == "2"),
            "{err}"
        );
        provider.join().unwrap();

        let provider = serve(&[("outblob", b""), ("generation", b"1\n")]);
        let err = q.quote(&[7; 64]).unwrap_err();
        assert!(matches!(err, TdxError::EmptyQuote { .. }), "{err}");
        provider.join().unwrap();

        let err = q.quote(&[7; 64]).unwrap_err();
        assert!(
            matches!(
                err,
                TdxError::Timeout {
                    timeout_ms: 200,
                    ..
                }
            ),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
