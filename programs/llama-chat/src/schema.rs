//! Constrained decoding for `response_format` `json_object` and
//! `json_schema`: a schema is compiled into a small grammar, and a
//! recogniser says whether a byte string can still be the start of (or is)
//! one JSON text the schema admits. The sampler only ever picks tokens whose
//! bytes keep the output such a prefix, and generation ends when the value is
//! complete, so the output is valid by construction (unless `max_tokens` cuts
//! it: `finish_reason` `length`).
//!
//! # The subset of JSON Schema
//!
//! Supported: `type` (one name or a list), `enum`, `const`, `anyOf`, `allOf`
//! with one subschema, `$ref` to a JSON pointer in the same document (`#`,
//! `#/$defs/..`, `#/definitions/..`; recursion allowed), `properties`,
//! `required`, `additionalProperties` (`false`, `true` or a schema),
//! `items`, `minItems`, `maxItems`, `uniqueItems: false`, `minLength`,
//! `maxLength`, and the annotations (`title`, `description`, `default`,
//! `examples`, ...). Any other keyword is refused by name rather than
//! ignored, because ignoring it would produce output the schema does not
//! admit (`pattern`, `format`, `minimum`, `oneOf`, ...).
//!
//! What the output looks like: an object with `properties` lists only those
//! properties, **in the order the schema gives them**, every `required` one
//! present and optional ones possibly left out (so `additionalProperties` is
//! then moot: nothing else is written). An object schema without
//! `properties` is a map with any keys (values by `additionalProperties`).
//! `enum` and `const` values are written compactly (as `serde_json` writes
//! them). Between tokens, runs of at most [`MAX_WHITESPACE_RUN`] whitespace
//! bytes.
//!
//! # Why no dead ends
//!
//! Compilation removes what can never be completed: an `anyOf` alternative,
//! an optional property or array items whose schema admits no finite value
//! (e.g. `{"$ref": "#"}` as its only content) are dropped, and a schema that
//! admits nothing is refused. Every state the recogniser can be in can
//! therefore still be completed (within [`MAX_DEPTH`]), so the sampler is
//! never left without a token, whatever the model prefers.
//!
//! The recogniser keeps a few alternative parses at once ("threads": for
//! `anyOf`, `enum` and keys that share a prefix), at most [`MAX_THREADS`].

use serde_json::{Map, Value};
use std::collections::HashMap;

/// Deepest nesting of frames on one parse (containers, keys, values).
pub const MAX_DEPTH: usize = 128;
/// Longest run of whitespace between two tokens of the JSON text: models
/// indent, but must not be able to loop on spaces forever.
pub const MAX_WHITESPACE_RUN: u8 = 32;
/// Most alternative parses kept at once (any one of them is a valid parse).
pub const MAX_THREADS: usize = 64;
/// Most grammar nodes a schema may compile to.
pub const MAX_NODES: usize = 4096;
/// Deepest nesting of subschemas in the schema document.
const MAX_SCHEMA_DEPTH: usize = 64;

type NodeId = u32;

/// Keywords that change nothing about the output.
const ANNOTATIONS: &[&str] = &[
    "$schema",
    "$id",
    "$comment",
    "$defs",
    "definitions",
    "title",
    "description",
    "default",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
];

/// Keywords that constrain the output and are enforced.
const SUPPORTED: &[&str] = &[
    "type",
    "enum",
    "const",
    "anyOf",
    "allOf",
    "$ref",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minLength",
    "maxLength",
];

#[derive(Debug, Clone, PartialEq)]
enum Node {
    /// Any of these nodes (after compilation: none of them an `AnyOf`).
    AnyOf(Vec<NodeId>),
    /// One of these exact JSON texts (indices into `Schema::lits`).
    Literals(Vec<u32>),
    /// A string of `min..=max` characters.
    Str { min: u32, max: u32 },
    /// A number (`integer`: no fraction, no exponent).
    Num { integer: bool },
    /// An object with these properties, in this order.
    Object(Vec<Prop>),
    /// An object with any keys and values of `value`.
    Map { value: NodeId },
    /// An array of `min..=max` values of `items`.
    Array { items: NodeId, min: u32, max: u32 },
}

#[derive(Debug, Clone, PartialEq)]
struct Prop {
    /// The key as JSON text, quotes included (index into `Schema::lits`).
    key: u32,
    value: NodeId,
    required: bool,
}

/// A compiled schema. Node 0 is the unconstrained string (map keys).
#[derive(Debug, Clone)]
pub struct Schema {
    nodes: Vec<Node>,
    lits: Vec<Vec<u8>>,
    root: NodeId,
}

const KEY_STRING: NodeId = 0;

impl Schema {
    /// The grammar of `json_object`: one JSON object, any content.
    pub fn any_object() -> Result<Schema, String> {
        Schema::compile(&serde_json::json!({"type": "object"}))
    }

    /// Compiles a JSON Schema (the subset in the module documentation).
    /// The error names the keyword or place that is refused.
    pub fn compile(schema: &Value) -> Result<Schema, String> {
        let mut c = Compiler::new(schema);
        let root = c.node(schema, "#", 0)?;
        c.finish(root)
    }

    /// The recogniser at the start of the output.
    pub fn start(&self) -> Prefix<'_> {
        Prefix::new(
            self,
            vec![Thread {
                frames: vec![Frame::Expect(self.root)],
                ws: 0,
            }],
        )
    }

    fn lit(&self, id: u32) -> &[u8] {
        &self.lits[id as usize]
    }

    fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }
}

struct Compiler<'a> {
    root: &'a Value,
    nodes: Vec<Node>,
    lits: Vec<Vec<u8>>,
    /// `$ref` targets compiled so far (by pointer).
    refs: HashMap<String, NodeId>,
    any: Option<NodeId>,
}

impl<'a> Compiler<'a> {
    fn new(root: &'a Value) -> Self {
        Compiler {
            root,
            nodes: vec![Node::Str {
                min: 0,
                max: u32::MAX,
            }],
            lits: Vec::new(),
            refs: HashMap::new(),
            any: None,
        }
    }

    fn push(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        (self.nodes.len() - 1) as NodeId
    }

    fn lit(&mut self, v: &Value) -> u32 {
        let text = v.to_string().into_bytes();
        if let Some(i) = self.lits.iter().position(|l| *l == text) {
            return i as u32;
        }
        self.lits.push(text);
        (self.lits.len() - 1) as u32
    }

    fn literals(&mut self, values: &[Value]) -> NodeId {
        let ids = values.iter().map(|v| self.lit(v)).collect();
        self.push(Node::Literals(ids))
    }

    /// Any JSON value (shared by everything unconstrained).
    fn any(&mut self) -> NodeId {
        if let Some(id) = self.any {
            return id;
        }
        let id = self.push(Node::AnyOf(Vec::new()));
        self.any = Some(id);
        let alts = vec![
            self.literals(&[Value::Null, Value::Bool(true), Value::Bool(false)]),
            self.push(Node::Num { integer: false }),
            KEY_STRING,
            self.push(Node::Array {
                items: id,
                min: 0,
                max: u32::MAX,
            }),
            self.push(Node::Map { value: id }),
        ];
        self.nodes[id as usize] = Node::AnyOf(alts);
        id
    }

    fn node(&mut self, v: &Value, at: &str, depth: usize) -> Result<NodeId, String> {
        if depth > MAX_SCHEMA_DEPTH {
            return Err(format!("{at}: nested deeper than {MAX_SCHEMA_DEPTH}"));
        }
        if self.nodes.len() > MAX_NODES {
            return Err(format!("the schema is larger than {MAX_NODES} nodes"));
        }
        let o = match v {
            Value::Bool(true) => return Ok(self.any()),
            Value::Bool(false) => return Err(format!("{at}: the schema `false` admits nothing")),
            Value::Object(o) => o,
            _ => return Err(format!("{at}: a schema must be an object or a boolean")),
        };
        for k in o.keys() {
            if !ANNOTATIONS.contains(&k.as_str()) && !SUPPORTED.contains(&k.as_str()) {
                return Err(format!(
                    "{at}: keyword `{k}` is not supported (supported: {})",
                    SUPPORTED.join(", ")
                ));
            }
        }
        let constraining: Vec<&str> = o
            .keys()
            .map(String::as_str)
            .filter(|k| SUPPORTED.contains(k))
            .collect();
        let alone = |kw: &str| -> Result<(), String> {
            match constraining.iter().find(|k| **k != kw) {
                Some(other) => Err(format!(
                    "{at}: `{kw}` beside `{other}` is not supported (put the constraints inside it)"
                )),
                None => Ok(()),
            }
        };
        if let Some(r) = o.get("$ref") {
            alone("$ref")?;
            return self.reference(r, at, depth);
        }
        if let Some(all) = o.get("allOf") {
            alone("allOf")?;
            return match all.as_array().map(Vec::as_slice) {
                Some([one]) => self.node(one, &format!("{at}/allOf/0"), depth + 1),
                _ => Err(format!(
                    "{at}: `allOf` is supported with exactly one subschema"
                )),
            };
        }
        if let Some(any) = o.get("anyOf") {
            alone("anyOf")?;
            let alts = any
                .as_array()
                .filter(|a| !a.is_empty())
                .ok_or_else(|| format!("{at}: `anyOf` must be a non-empty array"))?;
            let mut ids = Vec::with_capacity(alts.len());
            for (i, s) in alts.iter().enumerate() {
                ids.push(self.node(s, &format!("{at}/anyOf/{i}"), depth + 1)?);
            }
            return Ok(self.push(Node::AnyOf(ids)));
        }
        if let Some(c) = o.get("const") {
            return Ok(self.literals(std::slice::from_ref(c)));
        }
        if let Some(e) = o.get("enum") {
            let values = e
                .as_array()
                .filter(|a| !a.is_empty())
                .ok_or_else(|| format!("{at}: `enum` must be a non-empty array"))?;
            return Ok(self.literals(values));
        }
        if o.get("uniqueItems")
            .is_some_and(|u| u != &Value::Bool(false))
        {
            return Err(format!("{at}: `uniqueItems` is supported only as false"));
        }
        let types: Vec<&str> = match o.get("type") {
            None if o.contains_key("properties") => vec!["object"],
            None if o.contains_key("items") => vec!["array"],
            None => return Ok(self.any()),
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) if !ts.is_empty() => ts
                .iter()
                .map(|t| {
                    t.as_str()
                        .ok_or_else(|| format!("{at}: `type` lists a non-string"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(format!("{at}: `type` must be a name or a non-empty list")),
        };
        let mut ids = Vec::with_capacity(types.len());
        for t in types {
            ids.push(self.typed(t, o, at, depth)?);
        }
        Ok(match ids.as_slice() {
            [one] => *one,
            _ => self.push(Node::AnyOf(ids)),
        })
    }

    fn reference(&mut self, r: &Value, at: &str, depth: usize) -> Result<NodeId, String> {
        let r = r
            .as_str()
            .ok_or_else(|| format!("{at}: `$ref` must be a string"))?;
        let pointer = r.strip_prefix('#').ok_or_else(|| {
            format!("{at}: `$ref` {r:?} is not supported (only `#...` pointers into this schema)")
        })?;
        if let Some(&id) = self.refs.get(pointer) {
            return Ok(id);
        }
        let target = self
            .root
            .pointer(pointer)
            .ok_or_else(|| format!("{at}: `$ref` {r:?} points at nothing"))?;
        // A placeholder first, so a recursive reference finds it.
        let id = self.push(Node::AnyOf(Vec::new()));
        self.refs.insert(pointer.to_owned(), id);
        let inner = self.node(target, r, depth + 1)?;
        self.nodes[id as usize] = Node::AnyOf(vec![inner]);
        Ok(id)
    }

    fn typed(
        &mut self,
        t: &str,
        o: &Map<String, Value>,
        at: &str,
        depth: usize,
    ) -> Result<NodeId, String> {
        let count = |kw: &str, default: u32| -> Result<u32, String> {
            match o.get(kw) {
                None => Ok(default),
                Some(v) => v
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| format!("{at}: `{kw}` must be a non-negative integer")),
            }
        };
        let range = |min_kw: &str, max_kw: &str| -> Result<(u32, u32), String> {
            let (min, max) = (count(min_kw, 0)?, count(max_kw, u32::MAX)?);
            if min > max {
                return Err(format!("{at}: `{min_kw}` {min} is above `{max_kw}` {max}"));
            }
            Ok((min, max))
        };
        Ok(match t {
            "null" => self.literals(&[Value::Null]),
            "boolean" => self.literals(&[Value::Bool(true), Value::Bool(false)]),
            "integer" | "number" => self.push(Node::Num {
                integer: t == "integer",
            }),
            "string" => {
                let (min, max) = range("minLength", "maxLength")?;
                self.push(Node::Str { min, max })
            }
            "array" => {
                let (min, max) = range("minItems", "maxItems")?;
                let items = match o.get("items") {
                    None => self.any(),
                    Some(s) => self.node(s, &format!("{at}/items"), depth + 1)?,
                };
                self.push(Node::Array { items, min, max })
            }
            "object" => self.object(o, at, depth)?,
            other => return Err(format!("{at}: unknown `type` {other:?}")),
        })
    }

    fn object(&mut self, o: &Map<String, Value>, at: &str, depth: usize) -> Result<NodeId, String> {
        let required: Vec<&str> = match o.get("required") {
            None => Vec::new(),
            Some(Value::Array(names)) => names
                .iter()
                .map(|n| {
                    n.as_str()
                        .ok_or_else(|| format!("{at}: `required` lists a non-string"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(format!("{at}: `required` must be a list of names")),
        };
        let props = match o.get("properties") {
            None => None,
            Some(Value::Object(p)) => Some(p),
            Some(_) => return Err(format!("{at}: `properties` must be an object")),
        };
        if let Some(name) = required
            .iter()
            .find(|n| !props.is_some_and(|p| p.contains_key(**n)))
        {
            return Err(format!(
                "{at}: required property {name:?} has no schema in `properties`"
            ));
        }
        match props {
            Some(p) if !p.is_empty() => {
                let mut out = Vec::with_capacity(p.len());
                for (name, s) in p {
                    let value = self.node(s, &format!("{at}/properties/{name}"), depth + 1)?;
                    out.push(Prop {
                        key: self.lit(&Value::String(name.clone())),
                        value,
                        required: required.contains(&name.as_str()),
                    });
                }
                Ok(self.push(Node::Object(out)))
            }
            _ => match o.get("additionalProperties") {
                Some(Value::Bool(false)) => Ok(self.push(Node::Object(Vec::new()))),
                None | Some(Value::Bool(true)) => {
                    let value = self.any();
                    Ok(self.push(Node::Map { value }))
                }
                Some(s) => {
                    let value = self.node(s, &format!("{at}/additionalProperties"), depth + 1)?;
                    Ok(self.push(Node::Map { value }))
                }
            },
        }
    }

    /// Removes what can never be completed, flattens `anyOf` into concrete
    /// alternatives, and checks the root admits something.
    fn finish(mut self, root: NodeId) -> Result<Schema, String> {
        let n = self.nodes.len();
        // Which nodes admit a finite value: a least fixpoint.
        let mut ok = vec![false; n];
        loop {
            let mut changed = false;
            for i in 0..n {
                if ok[i] {
                    continue;
                }
                let now = match &self.nodes[i] {
                    Node::AnyOf(alts) => alts.iter().any(|a| ok[*a as usize]),
                    Node::Literals(l) => !l.is_empty(),
                    Node::Str { .. } | Node::Num { .. } | Node::Map { .. } => true,
                    Node::Object(props) => {
                        props.iter().all(|p| !p.required || ok[p.value as usize])
                    }
                    Node::Array { items, min, .. } => *min == 0 || ok[*items as usize],
                };
                if now {
                    ok[i] = true;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        if !ok[root as usize] {
            return Err("the schema admits no finite JSON value".into());
        }
        // Prune what cannot be completed, and flatten anyOf chains.
        let flat: Vec<Vec<NodeId>> = (0..n).map(|i| self.concrete(i as NodeId, &ok)).collect();
        for (i, node) in self.nodes.iter_mut().enumerate() {
            match node {
                Node::AnyOf(alts) => *alts = flat[i].clone(),
                Node::Object(props) => props.retain(|p| ok[p.value as usize]),
                Node::Array { items, max, .. } if !ok[*items as usize] => *max = 0,
                Node::Map { value } if !ok[*value as usize] => {
                    // Only `{}` can be written.
                    *node = Node::Object(Vec::new());
                }
                _ => {}
            }
        }
        Ok(Schema {
            nodes: self.nodes,
            lits: self.lits,
            root,
        })
    }

    /// The completable non-`anyOf` nodes `id` stands for.
    fn concrete(&self, id: NodeId, ok: &[bool]) -> Vec<NodeId> {
        let mut out = Vec::new();
        let mut seen = vec![false; self.nodes.len()];
        let mut todo = vec![id];
        while let Some(i) = todo.pop() {
            if std::mem::replace(&mut seen[i as usize], true) || !ok[i as usize] {
                continue;
            }
            match &self.nodes[i as usize] {
                Node::AnyOf(alts) => todo.extend(alts.iter().rev()),
                _ => out.push(i),
            }
        }
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

/// Most digits in a number's integer part, fraction and exponent: beyond
/// what an f64 holds, and a small model can otherwise write digits until
/// `max_tokens` (llama.cpp's JSON grammar bounds them the same way).
pub const MAX_NUMBER_DIGITS: u8 = 16;
const MAX_EXPONENT_DIGITS: u8 = 3;

/// Most digits in the part of a number `st` is in.
fn max_digits(st: Num) -> u8 {
    match st {
        Num::Exp | Num::ExpSign | Num::ExpDigits => MAX_EXPONENT_DIGITS,
        _ => MAX_NUMBER_DIGITS,
    }
}

impl Num {
    fn can_end(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::ExpDigits)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Esc {
    None,
    Backslash,
    /// `\u` hex digits still to come; `d`: the first was `d`/`D`; `high`: a
    /// high surrogate (its character is counted with the low one).
    Hex {
        left: u8,
        d: bool,
        high: bool,
    },
}

/// Where a container is: after its opening, after a value, after a comma.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seq {
    First,
    AfterValue,
    AfterComma,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// A value of this node comes next.
    Expect(NodeId),
    /// The rest of a literal: `lit[at..]`.
    Lit { lit: u32, at: u32 },
    /// This byte (after optional whitespace).
    Punct(u8),
    /// Inside a string of node `node`, `len` characters so far.
    Str { node: NodeId, len: u32, esc: Esc },
    /// Inside a number.
    Num { integer: bool, st: Num, digits: u8 },
    /// Inside an object: properties before `next` are done with.
    Obj { node: NodeId, next: u32, st: Seq },
    /// Inside a map with values of `value`.
    Map { value: NodeId, st: Seq },
    /// Inside an array with `count` values begun.
    Arr { node: NodeId, count: u32, st: Seq },
}

impl Frame {
    /// Whether whitespace may come here.
    fn between_tokens(self) -> bool {
        !matches!(
            self,
            Frame::Lit { .. } | Frame::Str { .. } | Frame::Num { .. }
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Thread {
    frames: Vec<Frame>,
    ws: u8,
}

/// How far the output got: every parse it can still be.
#[derive(Debug, Clone)]
pub struct Prefix<'s> {
    schema: &'s Schema,
    threads: Vec<Thread>,
    /// `first[b]`: whether byte `b` can come next.
    first: [bool; 256],
}

impl PartialEq for Prefix<'_> {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self.schema, other.schema) && self.threads == other.threads
    }
}

impl<'s> Prefix<'s> {
    fn new(schema: &'s Schema, threads: Vec<Thread>) -> Self {
        let mut p = Prefix {
            schema,
            threads,
            first: [false; 256],
        };
        let mut scratch = Vec::new();
        for b in 0..=255u8 {
            scratch.clear();
            for t in &p.threads {
                p.schema.feed(t.clone(), b, &mut scratch);
                if !scratch.is_empty() {
                    break;
                }
            }
            p.first[usize::from(b)] = !scratch.is_empty();
        }
        p
    }

    /// Whether the value is complete.
    pub fn is_done(&self) -> bool {
        self.threads.iter().any(|t| t.frames.is_empty())
    }

    /// Whether `bytes` can follow: what the sampler asks of every candidate
    /// token (cheaper than [`Prefix::after`], which also prepares the next
    /// step's table of first bytes).
    pub fn allows(&self, bytes: &[u8]) -> bool {
        match bytes {
            [] => true,
            [b] => self.first[usize::from(*b)],
            [b, ..] => self.first[usize::from(*b)] && self.run(bytes).is_some(),
        }
    }

    /// This prefix followed by `bytes`, if that can still start (or is) a
    /// value the schema admits.
    pub fn after(&self, bytes: &[u8]) -> Option<Self> {
        if let Some(&b) = bytes.first()
            && !self.first[usize::from(b)]
        {
            return None;
        }
        self.run(bytes)
            .map(|threads| Prefix::new(self.schema, threads))
    }

    fn run(&self, bytes: &[u8]) -> Option<Vec<Thread>> {
        let mut threads = self.threads.clone();
        for &b in bytes {
            let mut next = Vec::new();
            for t in threads {
                self.schema.feed(t, b, &mut next);
            }
            if next.is_empty() {
                return None;
            }
            threads = next;
        }
        Some(threads)
    }
}

fn add(out: &mut Vec<Thread>, t: Thread) {
    if t.frames.len() <= MAX_DEPTH && out.len() < MAX_THREADS && !out.contains(&t) {
        out.push(t);
    }
}

impl Schema {
    /// Every parse `t` followed by byte `b` can be, added to `out`.
    fn feed(&self, mut t: Thread, b: u8, out: &mut Vec<Thread>) {
        let ws = matches!(b, b' ' | b'\t' | b'\n' | b'\r');
        let top = t.frames.last().copied();
        if ws && top.is_none_or(Frame::between_tokens) {
            if t.ws < MAX_WHITESPACE_RUN {
                t.ws += 1;
                add(out, t);
            }
            return;
        }
        t.ws = 0;
        let Some(top) = top else { return };
        t.frames.pop();
        match top {
            Frame::Expect(n) => self.begin_value(t, n, b, out),
            Frame::Lit { lit, at } => {
                let l = self.lit(lit);
                if l.get(at as usize) == Some(&b) {
                    if at as usize + 1 < l.len() {
                        t.frames.push(Frame::Lit { lit, at: at + 1 });
                    }
                    add(out, t);
                }
            }
            Frame::Punct(c) => {
                if b == c {
                    add(out, t);
                }
            }
            Frame::Str { node, len, esc } => self.string(t, node, len, esc, b, out),
            Frame::Num {
                integer,
                st,
                digits,
            } => {
                let digit = b.is_ascii_digit();
                let next = match (st, b) {
                    // Enough digits in this part: the number must go on or end.
                    // (A digit cannot follow a complete number either.)
                    _ if digit && digits >= max_digits(st) => return,
                    (Num::Minus, b'0') => Num::Zero,
                    (Num::Minus, b'1'..=b'9') | (Num::Int, b'0'..=b'9') => Num::Int,
                    (Num::Zero | Num::Int, b'.') if !integer => Num::Dot,
                    (Num::Dot | Num::Frac, b'0'..=b'9') => Num::Frac,
                    (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') if !integer => Num::Exp,
                    (Num::Exp, b'+' | b'-') => Num::ExpSign,
                    (Num::Exp | Num::ExpSign | Num::ExpDigits, b'0'..=b'9') => Num::ExpDigits,
                    // The number ended: this byte is the enclosing value's.
                    _ if st.can_end() => return self.feed(t, b, out),
                    _ => return,
                };
                let digits = if next == st {
                    digits + 1
                } else {
                    u8::from(digit)
                };
                t.frames.push(Frame::Num {
                    integer,
                    st: next,
                    digits,
                });
                add(out, t);
            }
            Frame::Obj { node, next, st } => {
                let Node::Object(props) = self.node(node) else {
                    return;
                };
                let required_left = props[next as usize..].iter().any(|p| p.required);
                match (st, b) {
                    (Seq::First | Seq::AfterComma, b'"') => {
                        for (j, p) in props.iter().enumerate().skip(next as usize) {
                            let mut t2 = t.clone();
                            t2.frames.extend([
                                Frame::Obj {
                                    node,
                                    next: j as u32 + 1,
                                    st: Seq::AfterValue,
                                },
                                Frame::Expect(p.value),
                                Frame::Punct(b':'),
                                Frame::Lit { lit: p.key, at: 1 },
                            ]);
                            add(out, t2);
                            if p.required {
                                break;
                            }
                        }
                    }
                    (Seq::First | Seq::AfterValue, b'}') if !required_left => add(out, t),
                    (Seq::AfterValue, b',') if (next as usize) < props.len() => {
                        t.frames.push(Frame::Obj {
                            node,
                            next,
                            st: Seq::AfterComma,
                        });
                        add(out, t);
                    }
                    _ => {}
                }
            }
            Frame::Map { value, st } => match (st, b) {
                (Seq::First | Seq::AfterComma, b'"') => {
                    t.frames.extend([
                        Frame::Map {
                            value,
                            st: Seq::AfterValue,
                        },
                        Frame::Expect(value),
                        Frame::Punct(b':'),
                        Frame::Str {
                            node: KEY_STRING,
                            len: 0,
                            esc: Esc::None,
                        },
                    ]);
                    add(out, t);
                }
                (Seq::First | Seq::AfterValue, b'}') => add(out, t),
                (Seq::AfterValue, b',') => {
                    t.frames.push(Frame::Map {
                        value,
                        st: Seq::AfterComma,
                    });
                    add(out, t);
                }
                _ => {}
            },
            Frame::Arr { node, count, st } => {
                let Node::Array { items, min, max } = *self.node(node) else {
                    return;
                };
                match (st, b) {
                    (Seq::First | Seq::AfterValue, b']') if count >= min => add(out, t),
                    (Seq::AfterValue, b',') if count < max => {
                        t.frames.push(Frame::Arr {
                            node,
                            count,
                            st: Seq::AfterComma,
                        });
                        add(out, t);
                    }
                    (Seq::First | Seq::AfterComma, _) if count < max => {
                        t.frames.extend([
                            Frame::Arr {
                                node,
                                count: count + 1,
                                st: Seq::AfterValue,
                            },
                            Frame::Expect(items),
                        ]);
                        self.feed(t, b, out);
                    }
                    _ => {}
                }
            }
        }
    }

    /// The first byte `b` of a value of node `n`.
    fn begin_value(&self, t: Thread, n: NodeId, b: u8, out: &mut Vec<Thread>) {
        let push = |out: &mut Vec<Thread>, frame: Frame| {
            let mut t2 = t.clone();
            t2.frames.push(frame);
            add(out, t2);
        };
        match self.node(n) {
            Node::AnyOf(alts) => {
                for &a in alts {
                    // Flattened: `a` is not an AnyOf, so this recursion is one level.
                    if !matches!(self.node(a), Node::AnyOf(_)) {
                        self.begin_value(t.clone(), a, b, out);
                    }
                }
            }
            Node::Literals(ls) => {
                for &l in ls {
                    let text = self.lit(l);
                    if text.first() == Some(&b) {
                        if text.len() == 1 {
                            add(out, t.clone());
                        } else {
                            push(out, Frame::Lit { lit: l, at: 1 });
                        }
                    }
                }
            }
            Node::Str { .. } if b == b'"' => push(
                out,
                Frame::Str {
                    node: n,
                    len: 0,
                    esc: Esc::None,
                },
            ),
            Node::Num { integer } => {
                let st = match b {
                    b'-' => Num::Minus,
                    b'0' => Num::Zero,
                    b'1'..=b'9' => Num::Int,
                    _ => return,
                };
                push(
                    out,
                    Frame::Num {
                        integer: *integer,
                        st,
                        digits: u8::from(b != b'-'),
                    },
                );
            }
            Node::Object(_) if b == b'{' => push(
                out,
                Frame::Obj {
                    node: n,
                    next: 0,
                    st: Seq::First,
                },
            ),
            Node::Map { value } if b == b'{' => push(
                out,
                Frame::Map {
                    value: *value,
                    st: Seq::First,
                },
            ),
            Node::Array { .. } if b == b'[' => push(
                out,
                Frame::Arr {
                    node: n,
                    count: 0,
                    st: Seq::First,
                },
            ),
            _ => {}
        }
    }

    fn string(
        &self,
        mut t: Thread,
        node: NodeId,
        len: u32,
        esc: Esc,
        b: u8,
        out: &mut Vec<Thread>,
    ) {
        let Node::Str { min, max } = *self.node(node) else {
            return;
        };
        let (len, esc) = match esc {
            Esc::None => match b {
                b'"' if len >= min => return add(out, t),
                b'\\' if len < max => (len, Esc::Backslash),
                b'"' | b'\\' | 0..=0x1f => return,
                // UTF-8 continuation bytes belong to a character counted already.
                0x80..=0xbf => (len, Esc::None),
                _ if len < max => (len + 1, Esc::None),
                _ => return,
            },
            Esc::Backslash => match b {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => (len + 1, Esc::None),
                b'u' => (
                    len,
                    Esc::Hex {
                        left: 4,
                        d: false,
                        high: false,
                    },
                ),
                _ => return,
            },
            Esc::Hex { left, d, high } => {
                if !b.is_ascii_hexdigit() {
                    return;
                }
                let (d, high) = match left {
                    4 => (b.eq_ignore_ascii_case(&b'd'), false),
                    3 => (
                        d,
                        d && matches!(b.to_ascii_lowercase(), b'8'..=b'9' | b'a'..=b'b'),
                    ),
                    _ => (d, high),
                };
                if left == 1 {
                    // A high surrogate's character is counted with its low half.
                    (if high { len } else { len + 1 }, Esc::None)
                } else {
                    (
                        len,
                        Esc::Hex {
                            left: left - 1,
                            d,
                            high,
                        },
                    )
                }
            }
        };
        t.frames.push(Frame::Str { node, len, esc });
        add(out, t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn compile(v: Value) -> Schema {
        Schema::compile(&v).unwrap_or_else(|e| panic!("{e}"))
    }

    fn run<'s>(s: &'s Schema, text: &str) -> Option<Prefix<'s>> {
        s.start().after(text.as_bytes())
    }

    /// `text` is accepted and complete, and each of its prefixes is accepted
    /// and not complete.
    fn assert_whole(s: &Schema, text: &str) {
        let p = run(s, text).unwrap_or_else(|| panic!("refused {text:?}"));
        assert!(p.is_done(), "not done: {text:?}");
        for cut in (1..text.len()).filter(|&i| text.is_char_boundary(i)) {
            let prefix = &text[..cut];
            let p = run(s, prefix).unwrap_or_else(|| panic!("refused prefix {prefix:?}"));
            let complete = prefix.trim_end() == text.trim_end();
            assert_eq!(p.is_done(), complete, "{prefix:?}");
        }
    }

    /// `text` is refused, and `text` without its last byte is not.
    fn assert_refused_at_last_byte(s: &Schema, text: &str) {
        assert!(run(s, text).is_none(), "accepted {text:?}");
        let shorter = &text.as_bytes()[..text.len() - 1];
        assert!(
            s.start().after(shorter).is_some(),
            "refused before its last byte: {text:?}"
        );
    }

    #[test]
    fn json_object_admits_any_object_and_nothing_else() {
        let s = Schema::any_object().unwrap();
        for text in [
            "{}",
            " {\"a\": 1}\n",
            r#"{"a":[1,-2.5e+3,0,true,false,null,{"b":"c\"\\\u00e9\n"}],"d":{}}"#,
            "{\"é\": \"ünï ✓\", \"n\": [ ]}",
        ] {
            assert_whole(&s, text);
        }
        for text in [
            "[",
            "\"",
            "{a",
            "{\"a\" 1",
            "{\"a\":1,}",
            "{\"a\":01",
            "{\"a\":1.}",
            "{\"a\":-}",
            "{\"a\":tru}",
            "{\"a\":\"x\n",
            "{\"a\":\"\\x",
            "{\"a\":\"\\u12g",
            "{\"a\":[1}",
            "{\"a\":1]",
            "{} {",
            "{}x",
        ] {
            assert_refused_at_last_byte(&s, text);
        }
    }

    #[test]
    fn whitespace_runs_and_depth_are_bounded() {
        let s = Schema::any_object().unwrap();
        let spaces = " ".repeat(usize::from(MAX_WHITESPACE_RUN));
        assert!(run(&s, &format!("{{{spaces}}}")).is_some());
        assert!(run(&s, &format!("{{{spaces} }}")).is_none());
        // The object's frame, then one per array.
        let deep = format!("{{\"a\":{}", "[".repeat(MAX_DEPTH - 1));
        assert!(run(&s, &deep).is_some());
        assert!(run(&s, &format!("{deep}[")).is_none());
    }

    fn person() -> Schema {
        // As pydantic writes it: $defs, $ref, Optional as anyOf with null.
        compile(json!({
            "$defs": {
                "Address": {
                    "properties": {
                        "city": {"title": "City", "type": "string"},
                        "zip": {"anyOf": [{"type": "string", "minLength": 5, "maxLength": 5}, {"type": "null"}], "default": null}
                    },
                    "required": ["city"], "title": "Address", "type": "object"
                },
                "Color": {"enum": ["red", "green"], "title": "Color", "type": "string"}
            },
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer"},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
                "color": {"$ref": "#/$defs/Color"},
                "address": {"$ref": "#/$defs/Address"},
                "score": {"type": "number"},
                "ok": {"type": "boolean"}
            },
            "required": ["name", "age", "color"],
            "title": "Person", "type": "object"
        }))
    }

    #[test]
    fn a_pydantic_schema_admits_its_objects_in_property_order() {
        let s = person();
        for text in [
            r#"{"name": "Ann", "age": 31, "color": "red"}"#,
            r#"{"name":"B","age":-2,"tags":["x","y"],"color":"green","address":{"city":"Oslo","zip":"01234"},"score":1.5e3,"ok":true}"#,
            "{\n  \"name\": \"C\",\n  \"age\": 0,\n  \"color\": \"red\",\n  \"address\": {\"city\": \"X\", \"zip\": null}\n}",
        ] {
            assert_whole(&s, text);
        }
        for text in [
            // A required property left out: only `age` may follow `name`.
            r#"{"name":"A","c"#,
            // Another order.
            r#"{"a"#,
            // A property the schema does not list.
            r#"{"name":"A","age":1,"color":"red","x"#,
            // Not in the enum.
            r#"{"name":"A","age":1,"color":"b"#,
            // Not an integer.
            r#"{"name":"A","age":1."#,
            // Three tags.
            r#"{"name":"A","age":1,"tags":["a","b","#,
            // Four and six characters where five are required.
            r#"{"name":"A","age":1,"color":"red","address":{"city":"X","zip":"0123""#,
            r#"{"name":"A","age":1,"color":"red","address":{"city":"X","zip":"012345"#,
            // A required property of the nested object missing.
            r#"{"name":"A","age":1,"color":"red","address":{}"#,
            // Wrong types.
            r#"{"name":t"#,
            r#"{"name":"A","age":1,"color":"red","ok":n"#,
            // Closed before the required ones.
            r#"{"name":"A"}"#,
        ] {
            assert_refused_at_last_byte(&s, text);
        }
    }

    #[test]
    fn recursive_schemas_and_unions_of_types() {
        let tree = compile(json!({
            "$defs": {"node": {"type": "object", "properties": {
                "v": {"type": ["integer", "null"]},
                "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}
            }, "required": ["v"]}},
            "$ref": "#/$defs/node"
        }));
        assert_whole(
            &tree,
            r#"{"v":1,"kids":[{"v":null},{"v":2,"kids":[{"v":3,"kids":[]}]}]}"#,
        );
        assert_refused_at_last_byte(&tree, r#"{"v":1,"kids":[{"k"#);
        // A string of one character: a surrogate pair written as two escapes is one.
        let one = compile(json!({"type": "string", "maxLength": 1}));
        assert_whole(&one, r#""\ud83d\ude00""#);
        assert_whole(&one, "\"é\"");
        assert_refused_at_last_byte(&one, r#""ab"#);
        // const and enum of any JSON value, written compactly.
        let c = compile(json!({"type": "object", "properties": {
            "k": {"const": {"a": [1, 2]}}, "e": {"enum": [1, 12, "x", null]}
        }, "required": ["k", "e"]}));
        assert_whole(&c, r#"{"k":{"a":[1,2]},"e":12}"#);
        assert_whole(&c, r#"{"k":{"a":[1,2]},"e":1}"#);
        assert_refused_at_last_byte(&c, r#"{"k":{"a": "#);
        // A map: any keys, values by additionalProperties.
        let m = compile(json!({"type": "object", "additionalProperties": {"type": "integer"}}));
        assert_whole(&m, r#"{"x": 1, "y": -20}"#);
        assert_refused_at_last_byte(&m, r#"{"x": ""#);
        let none = compile(json!({"type": "object", "additionalProperties": false}));
        assert_whole(&none, "{}");
        assert_refused_at_last_byte(&none, "{\"");
        // Numbers have at most 16 digits a part, 3 in the exponent.
        let n = compile(json!({"type": "array", "items": {"type": "number"}}));
        let sixteen = "1234567890123456";
        assert_whole(&n, &format!("[-{sixteen}.{sixteen}e+123]"));
        assert_refused_at_last_byte(&n, &format!("[{sixteen}1"));
        assert_refused_at_last_byte(&n, &format!("[0.{sixteen}1"));
        assert_refused_at_last_byte(&n, "[1e1234");
        // A top-level number ends with whitespace.
        let n = compile(json!({"type": "number"}));
        assert!(!run(&n, "12").unwrap().is_done());
        assert!(run(&n, "12 ").unwrap().is_done());
    }

    #[test]
    fn what_cannot_be_completed_is_pruned_or_refused() {
        // An optional property that can never be written is left out.
        let s = compile(json!({"type": "object", "properties": {
            "a": {"$ref": "#/properties/a"}, "b": {"type": "integer"}
        }, "required": ["b"]}));
        assert_whole(&s, r#"{"b":1}"#);
        assert_refused_at_last_byte(&s, r#"{"a"#);
        // Items that can never be written: only the empty array.
        let s = compile(json!({"type": "array", "items": {"$ref": "#/items"}}));
        assert_whole(&s, "[]");
        assert_refused_at_last_byte(&s, "[{");
        // An anyOf alternative that cannot be completed is dropped.
        let s = compile(json!({"anyOf": [{"$ref": "#/anyOf/0"}, {"type": "null"}]}));
        assert_whole(&s, "null");
    }

    #[test]
    fn what_is_not_supported_is_refused_by_name() {
        for (schema, reason) in [
            (
                json!({"type": "string", "pattern": "^a"}),
                "keyword `pattern` is not supported",
            ),
            (
                json!({"type": "string", "format": "date"}),
                "keyword `format` is not supported",
            ),
            (
                json!({"type": "integer", "minimum": 0}),
                "keyword `minimum` is not supported",
            ),
            (json!({"oneOf": [true]}), "keyword `oneOf` is not supported"),
            (json!({"$ref": "https://x/s.json"}), "only `#...` pointers"),
            (json!({"$ref": "#/$defs/missing"}), "points at nothing"),
            (
                json!({"$ref": "#/$defs/a", "type": "string"}),
                "`$ref` beside `type`",
            ),
            (
                json!({"type": "object", "required": ["a"]}),
                "required property \"a\" has no schema",
            ),
            (
                json!({"type": "array", "minItems": 3, "maxItems": 2}),
                "`minItems` 3 is above `maxItems` 2",
            ),
            (
                json!({"type": "string", "maxLength": -1}),
                "`maxLength` must be a non-negative integer",
            ),
            (json!(false), "admits nothing"),
            (json!({"$ref": "#"}), "admits no finite JSON value"),
            (json!({"anyOf": []}), "`anyOf` must be a non-empty array"),
            (json!({"enum": []}), "`enum` must be a non-empty array"),
            (json!({"type": "date"}), "unknown `type` \"date\""),
            (json!({"allOf": [true, true]}), "exactly one subschema"),
            (
                json!({"type": "array", "uniqueItems": true}),
                "`uniqueItems` is supported only as false",
            ),
            (
                json!({"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"maximum": 1}}}}}),
                "#/properties/a/properties/b: keyword `maximum`",
            ),
            (json!([]), "must be an object or a boolean"),
        ] {
            let e = Schema::compile(&schema).unwrap_err();
            assert!(e.contains(reason), "{schema}: {e}");
        }
    }

    /// A small validator for the supported subset, independent of the
    /// recogniser: what the walks below produce must satisfy it.
    fn valid(root: &Value, schema: &Value, v: &Value) -> bool {
        let Some(o) = schema.as_object() else {
            return schema == &Value::Bool(true);
        };
        if let Some(r) = o.get("$ref").and_then(Value::as_str) {
            return valid(root, root.pointer(&r[1..]).unwrap(), v);
        }
        if let Some(all) = o.get("allOf").and_then(Value::as_array) {
            return all.iter().all(|s| valid(root, s, v));
        }
        if let Some(any) = o.get("anyOf").and_then(Value::as_array) {
            return any.iter().any(|s| valid(root, s, v));
        }
        if let Some(c) = o.get("const") {
            return c == v;
        }
        if let Some(e) = o.get("enum").and_then(Value::as_array) {
            return e.contains(v);
        }
        let types: Vec<&str> = match o.get("type") {
            Some(Value::String(t)) => vec![t],
            Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
            _ => vec!["null", "boolean", "number", "string", "array", "object"],
        };
        let n = |k: &str, d: u64| o.get(k).and_then(Value::as_u64).unwrap_or(d);
        types.iter().any(|t| match (*t, v) {
            ("null", Value::Null) | ("boolean", Value::Bool(_)) => true,
            // `-0` parses as a float here; it is an integer all the same.
            ("integer", Value::Number(x)) => x.as_f64().is_some_and(|f| f.fract() == 0.0),
            ("number", Value::Number(_)) => true,
            ("string", Value::String(s)) => {
                let len = s.chars().count() as u64;
                len >= n("minLength", 0) && len <= n("maxLength", u64::MAX)
            }
            ("array", Value::Array(a)) => {
                let items = o.get("items").unwrap_or(&Value::Bool(true));
                (a.len() as u64) >= n("minItems", 0)
                    && (a.len() as u64) <= n("maxItems", u64::MAX)
                    && a.iter().all(|x| valid(root, items, x))
            }
            ("object", Value::Object(m)) => {
                let props = o.get("properties").and_then(Value::as_object);
                let required = o.get("required").and_then(Value::as_array);
                let extra = o.get("additionalProperties").unwrap_or(&Value::Bool(true));
                required.is_none_or(|r| r.iter().all(|k| m.contains_key(k.as_str().unwrap())))
                    && m.iter().all(|(k, x)| match props.and_then(|p| p.get(k)) {
                        Some(s) => valid(root, s, x),
                        None => valid(root, extra, x),
                    })
            }
            _ => false,
        })
    }

    /// Random walks, one byte at a time, over what the recogniser allows:
    /// it never leaves a walk without a next byte (no dead ends), and every
    /// walk that completes is valid JSON the schema admits, with the
    /// properties in the schema's order.
    #[test]
    fn random_walks_never_dead_end_and_complete_to_valid_values() {
        let schemas = [
            json!({"type": "object"}),
            json!({
                "$defs": {"Color": {"enum": ["red", "green", "grey"]}},
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 3},
                    "n": {"type": ["integer", "null"]},
                    "x": {"type": "number"},
                    "tags": {"type": "array", "items": {"$ref": "#/$defs/Color"}, "minItems": 1, "maxItems": 3},
                    "more": {"type": "object", "additionalProperties": {"type": "boolean"}},
                    "k": {"const": [1, {"a": null}]}
                },
                "required": ["name", "tags"]
            }),
            json!({
                "$defs": {"node": {"type": "object", "properties": {
                    "v": {"type": "integer"},
                    "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}
                }, "required": ["v"]}},
                "anyOf": [{"$ref": "#/$defs/node"}, {"type": "string", "minLength": 2, "maxLength": 4}]
            }),
        ];
        let mut alphabet = b" \n{}[],:\"-0123456789.E+\\/".to_vec();
        alphabet.extend(b'a'..=b'z');
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for schema in &schemas {
            let s = compile(schema.clone());
            let mut completed = 0;
            for _ in 0..150 {
                let mut p = s.start();
                let mut out = Vec::new();
                while !p.is_done() && out.len() < 400 {
                    let next: Vec<u8> = alphabet
                        .iter()
                        .copied()
                        .filter(|b| p.allows(&[*b]))
                        .collect();
                    assert!(
                        !next.is_empty(),
                        "dead end after {:?}",
                        String::from_utf8_lossy(&out)
                    );
                    // Structure over content, so walks end.
                    let structural: Vec<u8> = next
                        .iter()
                        .copied()
                        .filter(|b| b"{}[],:\"".contains(b))
                        .collect();
                    let pool = if !structural.is_empty() && rand(3) > 0 {
                        &structural
                    } else {
                        &next
                    };
                    let b = pool[rand(pool.len())];
                    out.push(b);
                    p = p.after(&[b]).unwrap();
                }
                if !p.is_done() {
                    continue;
                }
                completed += 1;
                let v: Value = serde_json::from_slice(&out)
                    .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&out)));
                assert!(valid(schema, schema, &v), "{schema} does not admit {v}");
                // Keys in the schema's order.
                if let (Some(props), Some(m)) = (schema["properties"].as_object(), v.as_object()) {
                    let order: Vec<&String> = props.keys().filter(|k| m.contains_key(*k)).collect();
                    assert_eq!(m.keys().collect::<Vec<_>>(), order);
                }
            }
            assert!(completed > 30, "{schema}: only {completed} walks completed");
        }
    }

    #[test]
    fn allows_agrees_with_after_on_longer_pieces() {
        let s = person();
        let p = run(&s, r#"{"name": "#).unwrap();
        for piece in [
            "\"Ann\"",
            "\"",
            " \"x",
            "1",
            "\"a\",",
            "\"a\", \"age\":",
            "\"a\", \"col",
        ] {
            assert_eq!(
                p.allows(piece.as_bytes()),
                p.after(piece.as_bytes()).is_some(),
                "{piece:?}"
            );
        }
        assert!(p.allows(b"\"a\", \"age\":"));
        assert!(!p.allows(b"\"a\", \"col"));
    }
}
