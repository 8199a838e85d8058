//! Checks a protocol's text: TOML syntax and shape (serde, unknown keys rejected), then the rules
//! serde cannot express. Semantic problems are all collected, so a researcher fixes them in one pass.

use std::collections::HashSet;
use std::io::Read;
use std::path::Path;

use toml_edit::{ArrayOfTables, Document, Item, Table, Value};

use super::{Diagnostic, ModelSpec, Protocol, ProtocolError, RatingWhen};

/// A step into the TOML tree: a key of a table or an index of an array.
#[derive(Clone, Copy)]
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

use Seg::{Index, Key};

/// The first four bytes of every GGUF file.
const GGUF_MAGIC: &[u8; 4] = b"GGUF";

pub(super) fn check(path: &Path, text: &str, models_dir: &Path) -> Result<Protocol, ProtocolError> {
    let protocol: Protocol = toml::from_str(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        let message = e.message().trim().to_string();
        let help = shape_help(&message);
        ProtocolError::Invalid(vec![Diagnostic::at(path, text, offset, message, help)])
    })?;
    // The text parsed as TOML above; this second parse only supplies positions.
    let doc = Document::parse(text).ok();
    let mut checker = Checker {
        path,
        text,
        doc: doc.as_ref(),
        found: Vec::new(),
    };
    checker.run(&protocol, models_dir);
    if checker.found.is_empty() {
        Ok(protocol)
    } else {
        checker.found.sort_by_key(|d| (d.line, d.column));
        Err(ProtocolError::Invalid(checker.found))
    }
}

fn shape_help(message: &str) -> String {
    let help = if message.starts_with("unknown field") {
        "remove this key or correct its spelling (the accepted keys are listed above)"
    } else if message.starts_with("missing field") {
        "add the missing key to this table"
    } else if message.starts_with("invalid type") || message.starts_with("unknown variant") {
        "change the value to the expected type or one of the listed values"
    } else {
        "fix the TOML syntax at this position"
    };
    help.to_string()
}

struct Checker<'a> {
    path: &'a Path,
    text: &'a str,
    doc: Option<&'a Document<&'a str>>,
    found: Vec<Diagnostic>,
}

impl Checker<'_> {
    fn run(&mut self, p: &Protocol, models_dir: &Path) {
        self.slug(p);
        self.unique_ids("models", p.models.iter().map(|m| m.id.as_str()));
        self.unique_ids("arms", p.arms.iter().map(|a| a.id.as_str()));
        self.unique_ids("tasks", p.tasks.iter().map(|t| t.id.as_str()));
        self.unique_ids("ratings", p.ratings.iter().map(|r| r.id.as_str()));
        self.unique_ids(
            "questionnaire",
            p.questionnaire.iter().map(|q| q.id.as_str()),
        );
        for (i, model) in p.models.iter().enumerate() {
            let serves_an_arm = p.arms.iter().any(|a| a.model == model.id);
            self.model(i, model, models_dir, serves_an_arm);
        }
        self.arms(p, models_dir);
        self.tasks(p);
        self.ratings(p);
        self.collab(p);
        if p.session.min_turns == 0 {
            self.report(
                &[Key("session"), Key("min_turns")],
                "min_turns is 0".into(),
                "set min_turns to at least 1".into(),
            );
        }
        if p.session.max_turns != 0 && p.session.max_turns < p.session.min_turns {
            self.report(
                &[Key("session"), Key("max_turns")],
                format!(
                    "max_turns ({}) is below min_turns ({})",
                    p.session.max_turns, p.session.min_turns
                ),
                "raise max_turns, or set it to 0 for no cap".into(),
            );
        }
    }

    fn slug(&mut self, p: &Protocol) {
        let slug = &p.study.slug;
        let ok = !slug.is_empty()
            && slug.len() <= 64
            && slug
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if !ok {
            self.report(
                &[Key("study"), Key("slug")],
                format!("study slug {slug:?} is not URL-safe"),
                "use 1–64 characters from a–z, 0–9, '-' and '_'".into(),
            );
        }
    }

    fn unique_ids<'p>(&mut self, table: &str, ids: impl Iterator<Item = &'p str>) {
        let mut seen = HashSet::new();
        for (i, id) in ids.enumerate() {
            if id.trim().is_empty() {
                self.report(
                    &[Key(table), Index(i), Key("id")],
                    format!("[[{table}]] entry {} has an empty id", i + 1),
                    "give every entry a non-empty id".into(),
                );
            } else if !seen.insert(id) {
                self.report(
                    &[Key(table), Index(i), Key("id")],
                    format!("duplicate id {id:?} in [[{table}]]"),
                    format!("ids must be unique within [[{table}]]; rename one of them"),
                );
            }
        }
    }

    /// A model no arm uses (the CollabLLM core's judge or simulator) may be absent: `serve` does
    /// not load it, and the commands that do say how to fetch it. One that is there must be GGUF.
    fn model(&mut self, i: usize, model: &ModelSpec, models_dir: &Path, serves_an_arm: bool) {
        let at = [Key("models"), Index(i)];
        match (&model.file, &model.endpoint) {
            (Some(_), Some(_)) => self.report(
                &[Key("models"), Index(i), Key("endpoint")],
                format!("model {:?} has both `file` and `endpoint`", model.id),
                "keep `file` for a local GGUF or `endpoint` for a remote server, not both".into(),
            ),
            (None, None) => self.report(
                &at,
                format!("model {:?} has neither `file` nor `endpoint`", model.id),
                "add `file = \"name.gguf\"` (local) or `endpoint = \"http://host:port/v1\"` (remote)"
                    .into(),
            ),
            (None, Some(endpoint)) => {
                if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                    self.report(
                        &[Key("models"), Index(i), Key("endpoint")],
                        format!("endpoint {endpoint:?} is not an http(s) URL"),
                        "write the server's base URL, e.g. \"http://127.0.0.1:8081/v1\"".into(),
                    );
                }
            }
            (Some(_), None) => {
                let file = model.resolved_file(models_dir).expect("file is set");
                let needed = serves_an_arm || file.exists();
                let problem = needed.then(|| gguf_problem(&file).err()).flatten();
                if let Some(problem) = problem {
                    self.report(
                        &[Key("models"), Index(i), Key("file")],
                        format!("model {:?}: {problem}", model.id),
                        format!(
                            "run `collabllm models fetch` for the default model (`--judge` for the \
                             example protocols' judge), or point `file` at a GGUF file (relative \
                             paths resolve against the models directory {})",
                            models_dir.display()
                        ),
                    );
                }
            }
        }
        if let Some(sha) = &model.sha256 {
            if sha.len() != 64 || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
                self.report(
                    &[Key("models"), Index(i), Key("sha256")],
                    format!("sha256 {sha:?} is not 64 hexadecimal digits"),
                    "copy the value printed by `sha256sum FILE`".into(),
                );
            }
        }
        if model.context_tokens < 512 {
            self.report(
                &[Key("models"), Index(i), Key("context_tokens")],
                format!(
                    "context_tokens = {} is too small for a chat",
                    model.context_tokens
                ),
                "use at least 512 (the default is 8192)".into(),
            );
        }
        if model.slots == Some(0) {
            self.report(
                &[Key("models"), Index(i), Key("slots")],
                "slots = 0 leaves the model unable to serve anyone".into(),
                "use at least 1, or remove the key for the default".into(),
            );
        }
    }

    fn arms(&mut self, p: &Protocol, models_dir: &Path) {
        if p.arms.is_empty() {
            self.report(
                &[Key("arms")],
                "the protocol has no [[arms]]".into(),
                "add at least one [[arms]] table".into(),
            );
        }
        let known: Vec<&str> = p.models.iter().map(|m| m.id.as_str()).collect();
        for (i, arm) in p.arms.iter().enumerate() {
            if !known.contains(&arm.model.as_str()) {
                self.report(
                    &[Key("arms"), Index(i), Key("model")],
                    format!(
                        "arm {:?} uses model {:?}, which is not defined",
                        arm.id, arm.model
                    ),
                    format!(
                        "add a [[models]] entry with id = {:?}, or use one of: {}",
                        arm.model,
                        known.join(", ")
                    ),
                );
            }
            if !(arm.weight.is_finite() && arm.weight > 0.0) {
                self.report(
                    &[Key("arms"), Index(i), Key("weight")],
                    format!(
                        "arm {:?} has weight {}, which is not positive",
                        arm.id, arm.weight
                    ),
                    "use a weight above 0 (arms with equal weights are assigned equally often)"
                        .into(),
                );
            }
            if arm.quota == Some(0) {
                self.report(
                    &[Key("arms"), Index(i), Key("quota")],
                    format!("arm {:?} has quota 0 and can never be assigned", arm.id),
                    "remove the arm, or raise or remove its quota".into(),
                );
            }
            if let Err(problem) = arm.sampling.check() {
                self.report(
                    &[Key("arms"), Index(i), Key("sampling")],
                    format!("arm {:?}: {problem}", arm.id),
                    "correct the sampling setting".into(),
                );
            }
            if arm.lora.len() > 1 {
                self.report(
                    &[Key("arms"), Index(i), Key("lora"), Index(1)],
                    format!(
                        "arm {:?} has {} LoRA adapters; one is supported",
                        arm.id,
                        arm.lora.len()
                    ),
                    "merge the adapters into one (llama.cpp's export-lora) or keep one".into(),
                );
            }
            for (j, lora) in arm.lora.iter().enumerate() {
                let file = if lora.file.is_absolute() {
                    lora.file.clone()
                } else {
                    models_dir.join(&lora.file)
                };
                if let Err(problem) = gguf_problem(&file) {
                    self.report(
                        &[Key("arms"), Index(i), Key("lora"), Index(j), Key("file")],
                        format!("arm {:?}: LoRA adapter {problem}", arm.id),
                        "point `file` at a GGUF LoRA adapter (convert one with llama.cpp's \
                         convert_lora_to_gguf.py)"
                            .into(),
                    );
                }
            }
        }
    }

    fn tasks(&mut self, p: &Protocol) {
        if p.tasks.is_empty() {
            self.report(
                &[Key("tasks")],
                "the protocol has no [[tasks]]".into(),
                "add at least one [[tasks]] table with topics".into(),
            );
        }
        for (i, task) in p.tasks.iter().enumerate() {
            if task.topics.is_empty() {
                self.report(
                    &[Key("tasks"), Index(i)],
                    format!("task {:?} has no topics", task.id),
                    "add at least one [[tasks.topics]] entry".into(),
                );
            }
            let mut seen = HashSet::new();
            for (j, topic) in task.topics.iter().enumerate() {
                if !seen.insert(topic.id.as_str()) {
                    self.report(
                        &[Key("tasks"), Index(i), Key("topics"), Index(j), Key("id")],
                        format!("duplicate topic id {:?} in task {:?}", topic.id, task.id),
                        "topic ids must be unique within their task; rename one of them".into(),
                    );
                }
            }
        }
    }

    fn ratings(&mut self, p: &Protocol) {
        for (i, r) in p.ratings.iter().enumerate() {
            if r.min >= r.max {
                self.report(
                    &[Key("ratings"), Index(i), Key("max")],
                    format!(
                        "rating {:?} has min = {} and max = {}: the scale is empty",
                        r.id, r.min, r.max
                    ),
                    "make min smaller than max (the paper's scales run from 1 to 10)".into(),
                );
            }
            match (r.when, r.every_turns) {
                (RatingWhen::Periodic, None | Some(0)) => self.report(
                    &[Key("ratings"), Index(i), Key("when")],
                    format!("periodic rating {:?} has no every_turns", r.id),
                    "add `every_turns = 3` (or another positive number of turns)".into(),
                ),
                (RatingWhen::Final, Some(_)) => self.report(
                    &[Key("ratings"), Index(i), Key("every_turns")],
                    format!(
                        "final rating {:?} has every_turns, which only periodic ratings use",
                        r.id
                    ),
                    "remove every_turns, or set when = \"periodic\"".into(),
                ),
                _ => {}
            }
        }
    }

    fn collab(&mut self, p: &Protocol) {
        let c = &p.collab;
        let known: Vec<&str> = p.models.iter().map(|m| m.id.as_str()).collect();
        for (key, id) in [
            ("simulator_model", &c.simulator_model),
            ("judge_model", &c.judge_model),
        ] {
            if let Some(id) = id.as_deref().filter(|id| !known.contains(id)) {
                self.report(
                    &[Key("collab"), Key(key)],
                    format!("[collab] {key} {id:?} is not a [[models]] id"),
                    format!("use one of: {}", known.join(", ")),
                );
            }
        }
        for (key, value, least) in [
            ("samples", c.samples, 1),
            ("candidates", c.candidates, 2),
            ("max_turns", c.max_turns, 1),
            ("max_document_chars", c.max_document_chars, 1),
        ] {
            if value < least {
                self.report(
                    &[Key("collab"), Key(key)],
                    format!("[collab] {key} is {value}"),
                    format!("set {key} to at least {least}"),
                );
            }
        }
        if !(0.0..=1.0).contains(&c.proactive_share) {
            self.report(
                &[Key("collab"), Key("proactive_share")],
                format!(
                    "[collab] proactive_share {} is not a share between 0 and 1",
                    c.proactive_share
                ),
                "use e.g. 0.5 for half the fresh candidates, or 0 for none".into(),
            );
        }
        if !(c.min_gap_se.is_finite() && c.min_gap_se >= 0.0) {
            self.report(
                &[Key("collab"), Key("min_gap_se")],
                format!(
                    "[collab] min_gap_se {} is not a non-negative number",
                    c.min_gap_se
                ),
                "use a number of standard errors such as 2, or 0 for the margin alone".into(),
            );
        } else if c.min_gap_se > 0.0 && c.samples < 2 {
            self.report(
                &[Key("collab"), Key("min_gap_se")],
                format!(
                    "[collab] min_gap_se needs the spread of at least 2 rollouts, and samples is {}",
                    c.samples
                ),
                "set samples to 2 or more, or min_gap_se to 0".into(),
            );
        }
        if !(c.margin.is_finite() && c.margin >= 0.0) {
            self.report(
                &[Key("collab"), Key("margin")],
                format!("[collab] margin {} is not a non-negative number", c.margin),
                "use a margin such as 0.02".into(),
            );
        }
        let w = &c.weights;
        if ![w.bleu, w.tokens, w.interactivity, w.quality]
            .iter()
            .all(|x| x.is_finite())
        {
            self.report(
                &[Key("collab"), Key("weights")],
                "[collab.weights] has a weight that is not a finite number".into(),
                "use plain numbers such as bleu = 1.0, tokens = -0.1".into(),
            );
        }
        for (key, sampling) in [
            ("simulator_sampling", &c.simulator_sampling),
            ("judge_sampling", &c.judge_sampling),
        ] {
            if let Err(problem) = sampling.check() {
                self.report(
                    &[Key("collab"), Key(key)],
                    format!("[collab.{key}]: {problem}"),
                    "correct the sampling setting".into(),
                );
            }
        }
        if let Some(dir) = &c.prompts {
            let resolved = self.path.parent().unwrap_or(Path::new(".")).join(dir);
            if !resolved.is_dir() {
                self.report(
                    &[Key("collab"), Key("prompts")],
                    format!(
                        "[collab] prompts folder {} does not exist",
                        resolved.display()
                    ),
                    "give a folder relative to the protocol file, or remove `prompts` to use the \
                     built-in prompts"
                        .into(),
                );
            }
        }
    }

    fn report(&mut self, at: &[Seg], message: String, help: String) {
        let offset = self.offset_of(at);
        self.found
            .push(Diagnostic::at(self.path, self.text, offset, message, help));
    }

    /// Byte offset of the deepest node of `at` that exists in the document (the key, where
    /// there is one, so the line is the one a researcher edits).
    fn offset_of(&self, at: &[Seg]) -> usize {
        let Some(doc) = self.doc else { return 0 };
        let mut node = Node::Table(doc.as_table());
        let mut best = 0;
        for seg in at {
            let Some((next, span)) = node.child(*seg) else {
                break;
            };
            if let Some(start) = span {
                best = start;
            }
            node = next;
        }
        best
    }
}

/// A position in the parsed document.
enum Node<'a> {
    Table(&'a Table),
    Tables(&'a ArrayOfTables),
    Value(&'a Value),
}

impl<'a> Node<'a> {
    /// The child at `seg` and where it starts.
    fn child(&self, seg: Seg) -> Option<(Node<'a>, Option<usize>)> {
        match (self, seg) {
            (Node::Table(t), Key(k)) => {
                let (key, item) = t.get_key_value(k)?;
                let start = key.span().or_else(|| item.span()).map(|s| s.start);
                Some((Node::from_item(item)?, start))
            }
            (Node::Tables(a), Index(n)) => {
                let t = a.get(n)?;
                Some((Node::Table(t), t.span().map(|s| s.start)))
            }
            (Node::Value(Value::Array(a)), Index(n)) => {
                let v = a.get(n)?;
                Some((Node::Value(v), v.span().map(|s| s.start)))
            }
            (Node::Value(Value::InlineTable(t)), Key(k)) => {
                let (key, item) = t.get_key_value(k)?;
                let start = key.span().or_else(|| item.span()).map(|s| s.start);
                Some((Node::from_item(item)?, start))
            }
            _ => None,
        }
    }

    fn from_item(item: &'a Item) -> Option<Node<'a>> {
        match item {
            Item::Table(t) => Some(Node::Table(t)),
            Item::ArrayOfTables(a) => Some(Node::Tables(a)),
            Item::Value(v) => Some(Node::Value(v)),
            Item::None => None,
        }
    }
}

/// Why `file` is not a usable GGUF file, if it is not.
fn gguf_problem(file: &Path) -> Result<(), String> {
    let mut f = std::fs::File::open(file)
        .map_err(|e| format!("file {} cannot be opened ({e})", file.display()))?;
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic)
        .map_err(|_| format!("file {} is too short to be a GGUF file", file.display()))?;
    if &magic != GGUF_MAGIC {
        return Err(format!(
            "file {} is not a GGUF file (it does not start with \"GGUF\")",
            file.display()
        ));
    }
    Ok(())
}
