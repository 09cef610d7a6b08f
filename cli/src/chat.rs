//! `cinfer chat`: one sealed llama-chat request, streamed to stdout as it is
//! generated, then the receipt verified (and shown with `--show-receipt`).

use anyhow::{Context, Result, bail};
use cinfer_client::{ChatResult, Client, ReplyStatus};
use sha2::{Digest as _, Sha256};
use std::io::Write;
use std::path::PathBuf;

/// Where the server is and which keyserver identity to trust.
#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// Inference server base URL (http:// or https://; use https:// beyond localhost).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// PEM file of the CA certificates an https:// server must chain to (a
    /// deployment's private CA); default: Mozilla's roots.
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    #[command(flatten)]
    pub identity: IdentityArgs,
    /// k-of-n keyservers: how many of the pinned keyservers must state the
    /// same request key (and be named by the receipt as having opened the
    /// request) before a prompt is sealed to it.
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub keyserver_threshold: usize,
}

/// The pinned keyserver identity keys (hex of the SEC1 point, as `keyserver
/// public-identity` prints it), and how many must agree.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = true)]
pub struct IdentityArgs {
    /// Keyserver identity public key, hex. Repeat it for k-of-n keyservers.
    #[arg(long, value_name = "HEX")]
    pub keyserver_identity: Vec<String>,
    /// File holding keyserver identity public keys, hex, one per line.
    #[arg(long, value_name = "FILE")]
    pub keyserver_identity_file: Vec<PathBuf>,
}

impl ServerArgs {
    /// A client of the server pinned to the identities.
    pub fn client(&self) -> Result<Client> {
        let mut texts: Vec<String> = self.identity.keyserver_identity.clone();
        for path in &self.identity.keyserver_identity_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            texts.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_owned),
            );
        }
        let keys = texts
            .iter()
            .map(|t| hex::decode(t.trim()).context("a keyserver identity is not hex"))
            .collect::<Result<Vec<_>>>()?;
        let Some(first) = keys.first() else {
            bail!("--keyserver-identity or --keyserver-identity-file is required");
        };
        let mut client = Client::new(&self.server, first.clone())?;
        if keys.len() > 1 || self.keyserver_threshold != 1 {
            client = client.with_keyserver_quorum(keys, self.keyserver_threshold)?;
        }
        Ok(match &self.ca_cert {
            Some(path) => {
                let pem =
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                client
                    .with_root_certificates(&pem)
                    .with_context(|| format!("--ca-cert {}", path.display()))?
            }
            None => client,
        })
    }
}

/// The program component a reply must come from. One source is required:
/// by default `cinfer chat` and `cinfer proxy` refuse a reply whose verified
/// receipt names any other component (a server that had another admitted
/// program answer is caught), and seal requests bound to it (the loader refuses
/// to run them with another). `--any-program` opts out.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct ProgramPinArgs {
    /// The component digest (hex SHA-256) that must have run, e.g.
    /// `sha256sum llama-chat.wasm` of the signed release.
    #[arg(long, value_name = "HEX")]
    pub program_sha256: Option<String>,
    /// The component file (e.g. the signed release you reviewed) whose SHA-256
    /// must have run.
    #[arg(long, value_name = "FILE")]
    pub program_file: Option<PathBuf>,
    /// A loader policy (TOML): the digest its `[[program]]` entry lists for
    /// `--program` must have run. A policy that admits by signer lists none.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Accept a reply from whatever program the loader admitted (no pin).
    #[arg(long)]
    pub any_program: bool,
}

impl ProgramPinArgs {
    /// The digest (hex) replies for `program` must name; `None` with `--any-program`.
    pub fn expected(&self, program: &str) -> Result<Option<String>> {
        if let Some(hex) = &self.program_sha256 {
            return Ok(Some(hex.trim().to_ascii_lowercase()));
        }
        if let Some(path) = &self.program_file {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            return Ok(Some(hex::encode(Sha256::digest(&bytes))));
        }
        if let Some(path) = &self.policy {
            return policy_digest(path, program).map(Some);
        }
        Ok(None)
    }
}

/// The digest a loader policy's `[[program]]` entry named `program` pins.
fn policy_digest(path: &std::path::Path, program: &str) -> Result<String> {
    #[derive(serde::Deserialize)]
    struct Policy {
        #[serde(default)]
        program: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        name: String,
        sha256: Option<String>,
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let policy: Policy =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    policy
        .program
        .into_iter()
        .find(|e| e.name == program)
        .and_then(|e| e.sha256)
        .map(|d| d.to_ascii_lowercase())
        .with_context(|| {
            format!(
                "policy {} pins no component for program {program:?} (a policy that admits by signer lists no digest): \
                 give --program-sha256 or --program-file",
                path.display()
            )
        })
}

/// `cinfer chat` arguments.
#[derive(Debug, clap::Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Program to run.
    #[arg(long, default_value = "llama-chat")]
    pub program: String,
    #[command(flatten)]
    pub pin: ProgramPinArgs,
    /// Model id (llama-chat's default when left out).
    #[arg(long)]
    pub model: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Top-k sampling (llama-chat's default when left out).
    #[arg(long)]
    pub top_k: Option<u32>,
    /// Top-p sampling (llama-chat's default when left out).
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Sampling seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// A system message before the prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Print the verified receipt (to stderr) after the answer.
    #[arg(long)]
    pub show_receipt: bool,
    /// The user message.
    pub prompt: String,
}

/// The llama-chat request for these arguments.
pub fn request_json(args: &ChatArgs) -> serde_json::Value {
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(serde_json::json!({"role": "system", "content": system}));
    }
    messages.push(serde_json::json!({"role": "user", "content": args.prompt}));
    let mut req = serde_json::json!({
        "messages": messages,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "format": "text",
        // No implicit system turn: the template's default one ("You are a helpful AI
        // assistant named SmolLM…") derails the 135M model; --system sets one.
        "default_system": false,
    });
    let obj = req.as_object_mut();
    if let Some(obj) = obj {
        if let Some(m) = &args.model {
            obj.insert("model".into(), m.clone().into());
        }
        if let Some(k) = args.top_k {
            obj.insert("top_k".into(), k.into());
        }
        if let Some(p) = args.top_p {
            obj.insert("top_p".into(), p.into());
        }
        if let Some(s) = args.seed {
            obj.insert("seed".into(), s.into());
        }
    }
    req
}

/// The lines `--show-receipt` prints.
pub fn receipt_report(client: &Client, program: &str, result: &ChatResult) -> String {
    let r = &result.receipt;
    let mut out = format!(
        "receipt: verified (signed by an attested loader's receipt key; {} {})\n",
        if client.keyserver_threshold().is_some() {
            "trusting"
        } else {
            "keyserver identity"
        },
        client.identity_fingerprint()
    );
    out.push_str(&format!(
        "  program:      {program} (sha256 {})\n",
        r.program_sha256
    ));
    out.push_str(&format!("  policy:       sha256 {}\n", r.policy_sha256));
    if r.model_sha256.is_empty() {
        out.push_str("  models:       (none)\n");
    }
    for (id, digest) in &r.model_sha256 {
        out.push_str(&format!("  model:        {id} (sha256 {digest})\n"));
    }
    out.push_str(&format!("  request:      sha256 {}\n", r.request_sha256));
    out.push_str(&format!(
        "  reply:        sha256 {} ({} frames)\n",
        r.reply_sha256, r.reply_frames
    ));
    out.push_str(&format!("  outcome:      {}\n", r.outcome));
    if let Some(c) = &r.classifier {
        out.push_str(&format!(
            "  classifier:   {} (sha256 {}): {}\n",
            c.name, c.sha256, c.verdict
        ));
    }
    for k in &r.keyservers {
        let fp = hex::decode(k).map_or_else(|_| k.clone(), |b| cinfer_client::fingerprint(&b));
        out.push_str(&format!(
            "  keyserver:    {} (its share opened the request)\n",
            &fp[..fp.len().min(23)]
        ));
    }
    out.push_str(&format!(
        "  request key:  {} (valid {}..={}, Unix seconds)\n",
        result.statement.key_id, result.statement.not_before, result.statement.not_after
    ));
    out
}

/// Runs `cinfer chat`.
pub fn run(args: &ChatArgs) -> Result<()> {
    let mut client = args.server.client()?;
    if let Some(pin) = args.pin.expected(&args.program)? {
        client = client.with_program_pin(&args.program, &pin);
    }
    let request = serde_json::to_vec(&request_json(args))?;
    let mut stdout = std::io::stdout().lock();
    let mut write_failed = None;
    let mut printed = false;
    let result = client.chat(&args.program, &request, |chunk| {
        printed = true;
        if write_failed.is_none()
            && let Err(e) = stdout.write_all(chunk).and_then(|()| stdout.flush())
        {
            write_failed = Some(e);
        }
    });
    // End the answer's line (on failure only if part of an answer was printed).
    if result.is_ok() || printed {
        let _ = writeln!(stdout);
    }
    let _ = stdout.flush();
    drop(stdout);
    let result = result.context("chat request failed")?;
    if let Some(e) = write_failed {
        return Err(e).context("writing to stdout");
    }
    if args.show_receipt {
        eprint!("{}", receipt_report(&client, &args.program, &result));
    }
    if result.status == ReplyStatus::Refused {
        bail!(
            "the loader's safety classifier refused the request; the program did not run (receipt verified)"
        );
    }
    if result.status != ReplyStatus::Completed {
        bail!(
            "the program did not complete: {} (receipt verified)",
            cinfer_client::outcome_name(result.status)
        );
    }
    Ok(())
}
