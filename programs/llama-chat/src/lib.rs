//! `llama-chat`: chat with a llama-architecture GGUF model on the virtual
//! accelerator. Weights are loaded from a sealed model straight into
//! accelerator memory; this program only ever sees activations, logits and
//! token ids.
//!
//! Request (JSON):
//! ```json
//! {"model": "smollm2-135m-instruct",
//!  "messages": [{"role": "user", "content": "What is the capital of France?"}],
//!  "max_tokens": 64, "temperature": 0.0, "top_k": 40, "top_p": 0.95, "seed": 1}
//! ```
//! or `"prompt": "raw text"` instead of `messages` (tokenized as is, special
//! tokens parsed). `"format": "ids"` emits generated token ids (decimal,
//! space-separated) instead of text; `"ignore_eos": true` keeps generating past
//! end-of-generation tokens; `"default_system": false` leaves out the chat
//! template's default system turn. `"format": "events-v1"` emits JSON lines
//! with the token counts, the finish reason and typed errors (see [`reply`]).
//! `"stop": ["…"]` ends generation at the first of these strings (text
//! formats; the string is not emitted); `presence_penalty` and
//! `frequency_penalty` (OpenAI's, over the generated tokens) apply before
//! sampling. `"response_format": "json_object"` makes the output one JSON
//! object, and `"response_format": "json_schema"` with `"json_schema":
//! SCHEMA` one JSON value that SCHEMA admits, by constrained sampling (see
//! [`schema`]); SCHEMA is a JSON Schema, inline or as a string of JSON text
//! (which keeps the order of `properties` whatever the sender's JSON
//! library does).
//!
//! Every hyperparameter comes from the GGUF metadata (`{arch}.block_count`,
//! `.embedding_length`, `.attention.head_count[_kv]`, `.rope.freq_base`,
//! `.attention.layer_norm_rms_epsilon`, `.context_length`), so other llama
//! models run too.

use cinfer_gguf::Gguf;
use cinfer_guest::accel::Tensor;
use cinfer_guest::model::Model;
use cinfer_guest::{AccelError, Dtype, Error, Program, output, request};
use cinfer_tokenizer::{Tokenizer, Utf8Stream};
use serde::Deserialize;

pub mod reply;
mod sampling;
pub mod schema;
pub mod template;

use reply::{Code, Failure, Finish, Reply, StopMatcher};
use sampling::{Penalties, Rng, Sampling};
use schema::Schema;

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    content: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    #[serde(default = "default_model")]
    model: String,
    #[serde(default)]
    messages: Option<Vec<Message>>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default = "default_max_tokens")]
    max_tokens: u32,
    #[serde(default)]
    temperature: f32,
    #[serde(default = "default_top_k")]
    top_k: u32,
    #[serde(default = "default_top_p")]
    top_p: f32,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    ignore_eos: bool,
    #[serde(default = "default_true")]
    default_system: bool,
    #[serde(default)]
    format: Format,
    /// Strings that end generation (text formats only).
    #[serde(default)]
    stop: Vec<String>,
    #[serde(default)]
    presence_penalty: f32,
    #[serde(default)]
    frequency_penalty: f32,
    /// `events-v1` only: a `logprobs` event before each token's text.
    #[serde(default)]
    logprobs: bool,
    /// How many alternatives each `logprobs` event lists (at most 20).
    #[serde(default)]
    top_logprobs: u32,
    /// `json_object` or `json_schema`: the output is JSON, by constrained sampling.
    #[serde(default)]
    response_format: ResponseFormat,
    /// The schema of `json_schema`: a JSON Schema, or a string of its text.
    #[serde(default)]
    json_schema: Option<serde_json::Value>,
}

/// What the generated text must be.
#[derive(Debug, Default, Deserialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum ResponseFormat {
    /// Anything.
    #[default]
    Text,
    /// One JSON object (see [`schema`]).
    JsonObject,
    /// One JSON value the request's `json_schema` admits (see [`schema`]).
    JsonSchema,
}

#[derive(Debug, Default, Deserialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Format {
    #[default]
    Text,
    Ids,
    /// One JSON line per step: the chosen id and the top-10 log-probabilities
    /// (log-softmax over the whole vocabulary, before sampling).
    Logprobs,
    /// JSON lines: text, then the counts and finish reason, or a typed error.
    #[serde(rename = "events-v1")]
    Events,
}

/// Largest number of stop sequences (OpenAI's limit).
const MAX_STOPS: usize = 4;
/// Most alternatives per token in a `logprobs` event (OpenAI's limit).
const MAX_TOP_LOGPROBS: u32 = 20;

impl Request {
    /// Refuses parameters out of range (the proxy checks them too; this is
    /// the program's own line, for any client).
    fn check(&self) -> Result<(), Failure> {
        let bad = |m: String| Err(Failure::invalid(m));
        if self.max_tokens == 0 {
            return bad("max_tokens must be at least 1".into());
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!(
                "temperature {} is not a number >= 0",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p {} is outside (0, 1]", self.top_p));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(format!("{name} {v} is outside [-2, 2]"));
            }
        }
        if self.stop.len() > MAX_STOPS || self.stop.iter().any(String::is_empty) {
            return bad(format!("stop takes at most {MAX_STOPS} non-empty strings"));
        }
        if (self.logprobs || self.top_logprobs > 0) && self.format != Format::Events {
            return bad("logprobs and top_logprobs need the events-v1 format".into());
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return bad(format!(
                "top_logprobs {} is over {MAX_TOP_LOGPROBS}",
                self.top_logprobs
            ));
        }
        if self.top_logprobs > 0 && !self.logprobs {
            return bad("top_logprobs needs logprobs: true".into());
        }
        if !self.stop.is_empty() && matches!(self.format, Format::Ids | Format::Logprobs) {
            return bad("stop applies to the text formats only".into());
        }
        if self.json_schema.is_some() != (self.response_format == ResponseFormat::JsonSchema) {
            return bad(
                "json_schema goes with response_format json_schema, and only with it".into(),
            );
        }
        Ok(())
    }

    /// The grammar the output must follow, if any.
    fn schema(&self) -> Result<Option<Schema>, Failure> {
        let compiled = match (self.response_format, &self.json_schema) {
            (ResponseFormat::Text, _) => return Ok(None),
            (ResponseFormat::JsonObject, _) => Schema::any_object(),
            (ResponseFormat::JsonSchema, Some(serde_json::Value::String(text))) => {
                serde_json::from_str(text)
                    .map_err(|e| format!("not JSON: {e}"))
                    .and_then(|v| Schema::compile(&v))
            }
            (ResponseFormat::JsonSchema, Some(v)) => Schema::compile(v),
            (ResponseFormat::JsonSchema, None) => Err("missing".into()),
        };
        compiled
            .map(Some)
            .map_err(|e| Failure::invalid(format!("response_format json_schema: {e}")))
    }
}

/// ln Σ e^l over all logits, in f64 (shifted by the largest for range).
fn log_sum_exp(all: &[f32]) -> f64 {
    let max = all.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    f64::from(max)
        + all
            .iter()
            .map(|l| f64::from(l - max).exp())
            .sum::<f64>()
            .ln()
}

/// `{"id": ID, "top": [[id, logprob], ...]}` for one step.
fn logprob_line(logits: &Tensor, chosen: u32) -> Result<String, Error> {
    let all = logits.to_vec()?;
    let lse = log_sum_exp(&all);
    let top: Vec<String> = logits
        .top_k(10)?
        .iter()
        .map(|(id, l)| format!("[{id},{:.6}]", f64::from(*l) - lse))
        .collect();
    Ok(format!("{{\"id\":{chosen},\"top\":[{}]}}\n", top.join(",")))
}

/// Log-softmax of `logits` [1, vocab] at `chosen`, and its `top` largest
/// entries (largest first): the model's own distribution, before penalties,
/// temperature and truncation.
fn token_logprobs(logits: &Tensor, chosen: u32, top: u32) -> Result<(f32, Vec<(u32, f32)>), Error> {
    let all = logits.to_vec()?;
    let lse = log_sum_exp(&all);
    let at = |l: f32| (f64::from(l) - lse) as f32;
    let chosen_lp = all
        .get(chosen as usize)
        .map_or(f32::NEG_INFINITY, |l| at(*l));
    let top = if top == 0 {
        Vec::new()
    } else {
        logits
            .top_k(top)?
            .into_iter()
            .map(|(id, l)| (id, at(l)))
            .collect()
    };
    Ok((chosen_lp, top))
}

fn default_model() -> String {
    "smollm2-135m-instruct".into()
}
fn default_max_tokens() -> u32 {
    128
}
fn default_top_k() -> u32 {
    40
}
fn default_top_p() -> f32 {
    0.95
}
fn default_true() -> bool {
    true
}

/// Hyperparameters read from the metadata.
#[derive(Debug, Clone)]
pub struct Hparams {
    /// Transformer blocks.
    pub layers: u32,
    /// Embedding width.
    pub dim: u32,
    /// Query heads.
    pub heads: u32,
    /// Key/value heads.
    pub kv_heads: u32,
    /// RoPE base.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Training context length.
    pub context: u32,
}

impl Hparams {
    /// Reads the llama hyperparameters of `g`.
    pub fn from_gguf(g: &Gguf<'_>) -> Result<Self, String> {
        let arch = g.str("general.architecture").map_err(|e| e.to_string())?;
        if arch != "llama" {
            return Err(format!(
                "unsupported architecture `{arch}` (this program runs llama models)"
            ));
        }
        let u = |k: &str| -> Result<u32, String> {
            let v = g.u64(&format!("{arch}.{k}")).map_err(|e| e.to_string())?;
            u32::try_from(v).map_err(|_| format!("{arch}.{k} out of range"))
        };
        let heads = u("attention.head_count")?;
        let dim = u("embedding_length")?;
        let hp = Hparams {
            layers: u("block_count")?,
            dim,
            heads,
            kv_heads: u("attention.head_count_kv").unwrap_or(heads),
            rope_theta: g.f32(&format!("{arch}.rope.freq_base")).unwrap_or(10000.0),
            eps: g
                .f32(&format!("{arch}.attention.layer_norm_rms_epsilon"))
                .map_err(|e| e.to_string())?,
            context: u("context_length")?,
        };
        if hp.heads == 0
            || hp.kv_heads == 0
            || !hp.heads.is_multiple_of(hp.kv_heads)
            || !hp.dim.is_multiple_of(hp.heads)
        {
            return Err("inconsistent head counts".into());
        }
        if let Ok(rot) = u("rope.dimension_count")
            && rot != hp.dim / hp.heads
        {
            return Err(format!(
                "partial rotary embeddings ({rot} of {} dims) are not supported",
                hp.dim / hp.heads
            ));
        }
        Ok(hp)
    }

    fn head_dim(&self) -> u32 {
        self.dim / self.heads
    }
}

struct Layer {
    attn_norm: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    ffn_norm: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
}

struct Llama {
    hp: Hparams,
    embd: Tensor,
    out_norm: Tensor,
    output: Option<Tensor>,
    layers: Vec<Layer>,
}

impl Llama {
    fn load(model: &Model, hp: Hparams, ctx: u32) -> Result<Self, Error> {
        let t = |name: &str| model.load_tensor(name);
        let kv_shape = [ctx, hp.kv_heads, hp.head_dim()];
        let layers = (0..hp.layers)
            .map(|i| {
                let p = |n: &str| t(&format!("blk.{i}.{n}.weight"));
                Ok(Layer {
                    attn_norm: p("attn_norm")?,
                    wq: p("attn_q")?,
                    wk: p("attn_k")?,
                    wv: p("attn_v")?,
                    wo: p("attn_output")?,
                    ffn_norm: p("ffn_norm")?,
                    gate: p("ffn_gate")?,
                    up: p("ffn_up")?,
                    down: p("ffn_down")?,
                    k_cache: Tensor::zeros_of(Dtype::F16, &kv_shape)?,
                    v_cache: Tensor::zeros_of(Dtype::F16, &kv_shape)?,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Llama {
            embd: t("token_embd.weight")?,
            out_norm: t("output_norm.weight")?,
            // Tied embeddings: no output.weight means the head is token_embd.
            output: t("output.weight").ok(),
            layers,
            hp,
        })
    }

    /// Runs `ids` at positions `pos..`, returns the logits of the last one [1, vocab].
    fn forward(&self, ids: &[u32], pos: u32) -> Result<Tensor, Error> {
        let hp = &self.hp;
        let seq = ids.len() as u32;
        let x = self.embd.embedding(ids)?;
        // Every layer in one call: per layer exactly norm-matmul-many (Q/K/V),
        // rope-attention, matmul-add (output + residual), norm-matmul-many
        // (gate/up), silu-mul and matmul-add (down + residual), launched by
        // the accelerator without a round trip through this program.
        let mut ws = Vec::with_capacity(9 * self.layers.len());
        let mut caches = Vec::with_capacity(2 * self.layers.len());
        for l in &self.layers {
            ws.extend([
                &l.attn_norm,
                &l.wq,
                &l.wk,
                &l.wv,
                &l.wo,
                &l.ffn_norm,
                &l.gate,
                &l.up,
                &l.down,
            ]);
            caches.extend([&l.k_cache, &l.v_cache]);
        }
        let x = x.decoder_stack(&ws, &caches, pos, hp.eps, hp.rope_theta)?;
        // The head on the last row: rmsnorm and matmul in one launch.
        let last = if seq == 1 { x } else { x.rows(seq - 1, 1)? };
        let head = self.output.as_ref().unwrap_or(&self.embd);
        let mut logits = last.norm_matmul_many(&self.out_norm, hp.eps, &[head])?;
        // One result for one matrix (the WIT's contract).
        Ok(logits.pop().ok_or(AccelError::InvalidArgument)?)
    }
}

/// Tokens of the request's prompt (ChatML for `messages`, as is for `prompt`).
fn prompt_ids(req: &Request, tok: &Tokenizer, tmpl: &str) -> Result<Vec<u32>, Failure> {
    let text = match (&req.messages, &req.prompt) {
        (Some(msgs), None) => {
            let turns: Vec<(&str, &str)> = msgs
                .iter()
                .map(|m| (m.role.as_str(), m.content.as_str()))
                .collect();
            template::apply(tmpl, &turns, req.default_system).map_err(|e| {
                let code = if e.starts_with("unsupported chat template") {
                    Code::UnsupportedModel
                } else {
                    Code::InvalidRequest
                };
                Failure::new(code, e)
            })?
        }
        (None, Some(p)) => p.clone(),
        _ => {
            return Err(Failure::invalid(
                "give exactly one of `messages` and `prompt`",
            ));
        }
    };
    let mut ids = tok.encode(&text, true);
    if tok.add_bos()
        && let Some(b) = tok.bos()
        && ids.first() != Some(&b)
    {
        ids.insert(0, b);
    }
    Ok(ids)
}

/// The metadata this program reads: the hyperparameters, the chat template and
/// the tokenizer image that `cinfer seal-model` stores (read in place, nothing
/// to build), without the megabytes of vocabulary arrays. A model sealed
/// without an image gets the whole metadata, and the tokenizer is built from
/// its arrays (tens of milliseconds more per request).
fn metadata(model: &Model) -> Result<Vec<u8>, Error> {
    let part = model.metadata_keys(&[
        "general.*",
        "llama.*",
        "tokenizer.chat_template",
        cinfer_tokenizer::IMAGE_KEY,
    ])?;
    let has_image = cinfer_gguf::parse_metadata(&part)
        .is_ok_and(|g| g.get(cinfer_tokenizer::IMAGE_KEY).is_some());
    Ok(if has_image { part } else { model.metadata()? })
}

/// The request's format, read before the whole request parses (so that a
/// malformed request is refused in the format the client asked for).
fn requested_format(body: &[u8]) -> Format {
    #[derive(Deserialize)]
    struct Only {
        #[serde(default)]
        format: Format,
    }
    serde_json::from_slice::<Only>(body).map_or(Format::Text, |o| o.format)
}

/// Generates the reply to `req`.
fn generate(req: &Request, reply: Reply) -> Result<(), Failure> {
    req.check()?;
    let schema = req.schema()?;
    let model = Model::open(&req.model).map_err(|e| Failure::opening_model(&req.model, e))?;
    let meta = metadata(&model)?;
    let g = cinfer_gguf::parse_metadata(&meta)
        .map_err(|e| Failure::new(Code::UnsupportedModel, format!("model metadata: {e}")))?;
    let hp = Hparams::from_gguf(&g).map_err(|e| Failure::new(Code::UnsupportedModel, e))?;
    let template = g.str("tokenizer.chat_template").unwrap_or("").to_owned();
    drop(g);
    let tok = match Tokenizer::from_metadata(meta) {
        // An image this release cannot read: build from the whole metadata.
        Err(cinfer_tokenizer::TokenizerError::BadImage(_)) => {
            Tokenizer::from_metadata(model.metadata()?)
        }
        other => other,
    }
    .map_err(|e| Failure::new(Code::UnsupportedModel, format!("tokenizer: {e}")))?;
    let ids = prompt_ids(req, &tok, &template)?;
    if ids.is_empty() {
        return Err(Failure::invalid("empty prompt"));
    }
    let prompt_tokens = ids.len() as u32;
    if u64::from(prompt_tokens) >= u64::from(hp.context) {
        return Err(Failure::new(
            Code::ContextLengthExceeded,
            format!(
                "the prompt is {prompt_tokens} tokens; the model's context is {} tokens (one at least must be left to generate)",
                hp.context
            ),
        ));
    }
    // Generation stops at the context's end (finish_reason `length`).
    let ctx =
        (u64::from(prompt_tokens) + u64::from(req.max_tokens)).min(u64::from(hp.context)) as u32;
    let llama = Llama::load(&model, hp, ctx)?;
    let sampling = Sampling::new(req.temperature, req.top_k, req.top_p);
    let mut penalties = Penalties::new(req.presence_penalty, req.frequency_penalty);
    let mut rng = Rng::new(req.seed);
    let mut text = Utf8Stream::new();
    let mut stops = StopMatcher::new(req.stop.clone());
    let mut logits = llama.forward(&ids, 0)?;
    let mut generated = 0u32;
    let mut finish = Finish::Length;
    let mut stopped_by_sequence = false;
    let mut json = schema.as_ref().map(Schema::start);
    // `pos` is the position the sampled token will occupy.
    for (step, pos) in (0..req.max_tokens).zip(prompt_tokens..) {
        let next = match json {
            None => sampling.pick(&logits, &penalties, &mut rng, |id| {
                req.ignore_eos && tok.is_eog(id)
            })?,
            // Only tokens that keep the output the start of a value the
            // schema admits; never an end of generation before it is complete.
            Some(ref prefix) => sampling
                .pick_allowed(&logits, &penalties, &mut rng, |id| {
                    let bytes = tok.token_bytes(id, false);
                    !bytes.is_empty() && !tok.is_eog(id) && prefix.allows(&bytes)
                })?
                .ok_or_else(|| {
                    Failure::new(
                        Code::Internal,
                        "no token of the vocabulary continues the JSON output",
                    )
                })?,
        };
        let json_done = match &mut json {
            Some(prefix) => {
                if let Some(p) = prefix.after(&tok.token_bytes(next, false)) {
                    *prefix = p;
                }
                prefix.is_done()
            }
            None => false,
        };
        generated += 1;
        penalties.record(next);
        let eog = tok.is_eog(next);
        match req.format {
            Format::Ids => output::emit_str(&format!("{next} ")),
            Format::Logprobs => output::emit_str(&logprob_line(&logits, next)?),
            Format::Text | Format::Events if !eog => {
                if req.logprobs {
                    let (lp, top) = token_logprobs(&logits, next, req.top_logprobs)?;
                    reply.logprobs(&tok, next, lp, &top);
                }
                let piece = text.push(&tok.token_bytes(next, false));
                let (out, stopped) = stops.push(&piece);
                reply.text(&out);
                if stopped {
                    finish = Finish::Stop;
                    stopped_by_sequence = true;
                    break;
                }
            }
            Format::Text | Format::Events => {}
        }
        if (eog && !req.ignore_eos) || json_done {
            finish = Finish::Stop;
            break;
        }
        if step + 1 == req.max_tokens || pos >= ctx {
            break;
        }
        logits = llama.forward(&[next], pos)?;
    }
    if !stopped_by_sequence {
        // The last bytes of the text (and what the stop matcher held back):
        // they may still complete a stop sequence.
        let (out, stopped) = stops.push(&text.finish());
        reply.text(&out);
        if stopped {
            finish = Finish::Stop;
        } else {
            reply.text(&stops.finish());
        }
    }
    reply.end(finish, prompt_tokens, generated);
    Ok(())
}

struct LlamaChat;

impl Program for LlamaChat {
    fn run() -> Result<(), Error> {
        let body = request::open()?;
        let format = requested_format(&body);
        let reply = Reply {
            events: format == Format::Events,
        };
        let parsed = serde_json::from_slice::<Request>(&body)
            .map_err(|e| Failure::invalid(format!("bad request JSON: {e}")));
        drop(body);
        match parsed.and_then(|req| generate(&req, reply)) {
            Ok(()) => Ok(()),
            Err(f) => {
                reply.error(&f);
                Err(Error::BadRequest)
            }
        }
    }
}

cinfer_guest::program!(LlamaChat);
