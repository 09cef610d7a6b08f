//! The official `openai` Python package against `cinfer proxy` in front of the
//! whole system (swtpm, keyserver, trusted loader, inference server, the real
//! SmolLM2 model): every answer goes through the sealed path and carries a
//! verified receipt; usage, finish reasons, stop sequences, seeds,
//! log-probabilities, both endpoints, streaming and not, and the
//! client-mistake statuses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cinfer_e2e::{MODEL_ID, Proxy, System};
use std::process::{Command, Stdio};

/// A Python with the `openai` package (`pip install openai`), or why there is none.
fn python_with_openai() -> Result<String, String> {
    let has = |py: &str| {
        Command::new(py)
            .args(["-c", "import openai"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let mut candidates = Vec::new();
    if let Some(py) = std::env::var_os("CINFER_OPENAI_PYTHON") {
        candidates.push(py.to_string_lossy().into_owned());
    }
    if let Some(home) = std::env::var_os("HOME") {
        let venv = std::path::Path::new(&home).join(".cache/cinfer/sigstore-venv/bin/python");
        candidates.push(venv.to_string_lossy().into_owned());
    }
    candidates.push("python3".into());
    candidates
        .into_iter()
        .find(|py| has(py))
        .ok_or_else(|| {
            "no Python with the `openai` package (pip install openai into ~/.cache/cinfer/sigstore-venv, or set CINFER_OPENAI_PYTHON)".into()
        })
}

/// `cinfer proxy` in front of `system`, pinned to the built llama-chat; its base URL.
fn start_proxy(system: &System) -> (Proxy, String) {
    let (proxy, _, base) = cinfer_e2e::start_proxy(&system.server_url, &system.proxy_pins());
    (proxy, base)
}

const SCRIPT: &str = r#"
import sys, openai
base, M = sys.argv[1], sys.argv[2]
c = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300)
q = [{"role": "user", "content": "What is the capital of France?"}]

# Non-streaming: the answer, a verified receipt, usage, finish_reason stop.
r = c.chat.completions.create(model=M, messages=q, max_tokens=48, temperature=0)
full = r.choices[0].message.content
assert "Paris" in full, full
assert r.choices[0].finish_reason == "stop", r
u = r.usage
assert u.prompt_tokens > 5 and 0 < u.completion_tokens < 48, u
assert u.total_tokens == u.prompt_tokens + u.completion_tokens, u
assert r.model_extra["cinfer"]["verified"] is True, r
assert r.model_extra["cinfer"]["receipt"]["outcome"] == "completed", r
assert M in r.model_extra["cinfer"]["receipt"]["model_sha256"], r

# max_tokens cut the answer: finish_reason length, exactly that many tokens.
r = c.chat.completions.create(model=M, messages=q, max_tokens=3, temperature=0)
assert r.choices[0].finish_reason == "length", r
assert r.usage.completion_tokens == 3, r.usage
assert full.startswith(r.choices[0].message.content), (full, r.choices[0].message.content)

# Streaming gives the same greedy text, then finish_reason, then usage.
parts, finish, usage = [], None, None
for ch in c.chat.completions.create(model=M, messages=q, max_tokens=48, temperature=0,
                                     stream=True, stream_options={"include_usage": True}):
    if ch.choices and ch.choices[0].delta.content:
        parts.append(ch.choices[0].delta.content)
    if ch.choices and ch.choices[0].finish_reason:
        finish = ch.choices[0].finish_reason
    if ch.usage:
        usage = ch.usage
assert "".join(parts) == full, (parts, full)
assert finish == "stop", finish
assert usage is not None and usage.completion_tokens == u.completion_tokens, usage
finish = [ch.choices[0].finish_reason for ch in c.chat.completions.create(
    model=M, messages=q, max_tokens=2, stream=True) if ch.choices and ch.choices[0].finish_reason]
assert finish == ["length"], finish

# A stop sequence: the text before it, never the sequence itself.
r = c.chat.completions.create(model=M, messages=q, max_tokens=48, temperature=0, stop=["Paris"])
assert r.choices[0].message.content == full[: full.index("Paris")], (r.choices[0].message.content, full)
assert r.choices[0].finish_reason == "stop", r

# JSON mode: constrained sampling in the program makes the answer one JSON object.
import json
r = c.chat.completions.create(model=M, max_tokens=160, temperature=0, response_format={"type": "json_object"},
    messages=[{"role": "user", "content": "Describe Paris as JSON with the keys name and country."}])
assert r.choices[0].finish_reason == "stop", r
assert isinstance(json.loads(r.choices[0].message.content), dict), r

# Structured outputs: a pydantic model as the schema (the SDK's `parse` sends it
# strict); the program samples only what the schema admits, keys in its order.
from typing import Annotated, Literal
from pydantic import BaseModel, Field
class City(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population_millions: float
    landmarks: list[Annotated[str, Field(max_length=40)]] = Field(min_length=1, max_length=3)
    continent: Literal["Europe", "Asia", "Africa", "America", "Oceania"]
for stream in (False, True):
    kw = dict(model=M, max_tokens=200, temperature=0, response_format=City,
              messages=[{"role": "user", "content": "Describe Paris as JSON."}])
    if stream:
        with c.chat.completions.stream(**kw) as s:
            for _ in s:
                pass
            r = s.get_final_completion()
    else:
        r = c.chat.completions.parse(**kw)
    city = r.choices[0].message.parsed
    assert isinstance(city, City) and r.choices[0].finish_reason == "stop", r
    assert list(json.loads(r.choices[0].message.content)) == list(City.model_fields), r.choices[0].message.content
# A schema the program cannot enforce is a 400 naming the keyword, never content.
try:
    c.chat.completions.create(model=M, max_tokens=8, messages=q, response_format={"type": "json_schema",
        "json_schema": {"name": "s", "schema": {"type": "string", "pattern": "^[a-z]+$"}}})
    raise AssertionError("an unenforceable schema was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "response_format" and "keyword `pattern` is not supported" in e.body["message"], e.body

# Seeded sampling is reproducible; penalties are accepted.
ask = lambda seed: c.chat.completions.create(model=M, messages=q, max_tokens=12, temperature=0.9,
                                              seed=seed, frequency_penalty=0.5).choices[0].message.content
assert ask(7) == ask(7)
# n choices: one sealed exchange each (seeds 3 and 4), reproducible as a whole.
pair = lambda: [ch.message.content for ch in c.chat.completions.create(
    model=M, messages=q, max_tokens=12, temperature=1.0, seed=3, n=2).choices]
first = pair()
assert len(first) == 2 and first[0] != first[1], first
assert pair() == first

# Log-probabilities: one entry per token, the greedy choice the most likely.
r = c.chat.completions.create(model=M, messages=q, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
lp = r.choices[0].logprobs.content
assert len(lp) == 4 and r.choices[0].finish_reason == "length", r
assert bytes(b for t in lp for b in t.bytes).decode() == r.choices[0].message.content, lp
assert all(t.token == t.top_logprobs[0].token and len(t.top_logprobs) == 3 and t.logprob <= 0 for t in lp), lp
streamed = [t.token for ch in c.chat.completions.create(model=M, messages=q, max_tokens=4, temperature=0,
            logprobs=True, stream=True) if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
assert streamed == [t.token for t in lp], (streamed, lp)

# The completions endpoint (raw prompt, no template).
r = c.completions.create(model=M, prompt="Once upon a time", max_tokens=5, temperature=0)
assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5, r
assert r.usage.prompt_tokens == 4, r.usage
texts = [ch.choices[0].text for ch in c.completions.create(
    model=M, prompt="Once upon a time", max_tokens=5, temperature=0, stream=True) if ch.choices]
assert "".join(texts) == r.choices[0].text, (texts, r)

# Models.
assert [m.id for m in c.models.list()] == [M]
assert c.models.retrieve(M).id == M

# Client mistakes: 400 and 404 with the reason, never a retryable 5xx.
def error_of(**kw):
    try:
        c.chat.completions.create(**kw)
    except openai.APIStatusError as e:
        return e.status_code, e.body
    raise SystemExit("accepted: %r" % (kw,))
st, body = error_of(model=M, messages=q, temperature=5)
assert st == 400 and body["param"] == "temperature", (st, body)
st, body = error_of(model=M, messages=q, max_tokens=0)
assert st == 400 and body["param"] == "max_tokens", (st, body)
long = [{"role": "user", "content": "hello " * 9000}]
for stream in (False, True):
    st, body = error_of(model=M, messages=long, stream=stream)
    assert st == 400 and body["code"] == "context_length_exceeded", (st, body)
    st, body = error_of(model="gpt-4", messages=q, stream=stream)
    assert st == 404 and body["code"] == "model_not_found", (st, body)
try:
    c.models.retrieve("gpt-4")
    raise SystemExit("an unknown model was retrieved")
except openai.NotFoundError:
    pass
print("openai package against the sealed path: OK")
"#;

#[test]
fn the_openai_package_works_through_the_proxy_and_the_sealed_path() {
    let python = match python_with_openai() {
        Ok(p) => p,
        Err(why) => {
            assert!(std::env::var_os("CI").is_none(), "{why}");
            println!("SKIPPED: {why}");
            return;
        }
    };
    let system = System::start("openai");
    let (_proxy, base) = start_proxy(&system);
    let out = Command::new(&python)
        .args(["-c", SCRIPT, &base, MODEL_ID])
        .output()
        .expect("python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("OK"), "{stdout}");
    // The server read each run's outcome from its receipt: the answers
    // completed, the context overflows and unknown models failed in the
    // program (never counted as completed).
    let metrics = system.metrics();
    let count = |outcome: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "cinfer_server_requests_total{{outcome=\"{outcome}\"}} "
                ))
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {outcome} count in\n{metrics}"))
    };
    assert!(count("completed") > 10, "{metrics}");
    assert!(count("run_failed") >= 4, "{metrics}");
    // And per loader, by the receipts' own outcomes.
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("cinfer_server_loader_runs_total{")
                && l.contains("outcome=\"program-failed\"")),
        "{metrics}"
    );
}
