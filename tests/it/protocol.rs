//! Protocol files: the shipped examples are valid and match the paper's study; every kind of
//! mistake is reported with its file, line and a fix, several at once.

use std::path::Path;

use collabllm::protocol::{AssignmentMethod, LoadedProtocol, ProtocolError, RatingWhen};

use crate::common::{protocol, write_temp};

/// A valid protocol; tests replace parts of it to make one mistake at a time.
const VALID: &str = r#"
[study]
slug = "t"
title = "Test"
version = "1"

[consent]
version = "c1"
text = "Agree?"

[[models]]
id = "m"
file = "fake.gguf"

[[arms]]
id = "base"
model = "m"
weight = 1
system_prompt = "Be helpful."

[[arms]]
id = "proactive"
model = "m"
weight = 2
system_prompt = "Ask questions."

[[tasks]]
id = "blog"
kind = "blog post"
instructions = "Write."
[[tasks.topics]]
id = "a"
title = "A"

[[ratings]]
id = "interaction"
question = "How was it?"
when = "periodic"
every_turns = 3
min = 1
max = 10

[outcomes.completed]
code = "C"
[outcomes.no_consent]
code = "N"
[outcomes.timed_out]
code = "T"
"#;

/// A models directory holding a file that looks like a GGUF model.
fn models_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("fake.gguf"), b"GGUF\x03\x00\x00\x00").unwrap();
    dir
}

fn check(text: &str) -> Result<LoadedProtocol, ProtocolError> {
    let models = models_dir();
    LoadedProtocol::from_text(Path::new("study.toml"), text.to_string(), models.path())
}

/// 1-based line of the first line containing `needle` (the `nth` occurrence, from 0).
fn line_of(text: &str, needle: &str, nth: usize) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .nth(nth)
        .unwrap_or_else(|| panic!("{needle:?} not in text"))
        .0
        + 1
}

/// The single diagnostic of an invalid protocol.
fn only_problem(text: &str) -> collabllm::protocol::Diagnostic {
    let err = check(text).expect_err("the protocol must be rejected");
    let d = err.diagnostics();
    assert_eq!(d.len(), 1, "expected one problem, got: {err}");
    d[0].clone()
}

#[test]
fn the_valid_base_protocol_passes() {
    let loaded = check(VALID).unwrap();
    assert_eq!(loaded.protocol.arms.len(), 2);
    assert_eq!(loaded.sha256.len(), 64);
}

/// Files and stored versions from before the screening outcome was retired still load, checked
/// and stored alike, and a misspelt outcome is still refused.
#[test]
fn a_protocol_with_the_retired_screening_outcome_still_loads() {
    let old = format!("{VALID}[outcomes.screened_out]\ncode = \"S\"\n");
    let loaded = check(&old).unwrap();
    assert_eq!(
        collabllm::protocol::Protocol::from_stored(&old).unwrap(),
        loaded.protocol
    );
    let misspelt = format!("{VALID}[outcomes.screened]\ncode = \"S\"\n");
    let d = only_problem(&misspelt);
    assert_eq!(d.line, line_of(&misspelt, "[outcomes.screened]", 0));
}

#[test]
fn a_toml_syntax_error_names_its_line() {
    let text = VALID.replace("[consent]", "[consent");
    let d = only_problem(&text);
    assert_eq!(d.line, line_of(&text, "[consent", 0));
    assert!(d.help.contains("syntax"), "{d}");
}

#[test]
fn an_unknown_key_is_rejected_at_its_line() {
    let text = VALID.replace("title = \"Test\"", "title = \"Test\"\ncolour = \"blue\"");
    let d = only_problem(&text);
    assert_eq!(d.line, line_of(&text, "colour", 0));
    assert!(d.message.contains("unknown field `colour`"), "{d}");
    assert!(d.help.contains("spelling"), "{d}");
}

#[test]
fn a_missing_field_names_the_table_that_lacks_it() {
    let text = VALID.replace("title = \"Test\"\n", "");
    let d = only_problem(&text);
    assert!(d.message.contains("missing field `title`"), "{d}");
    assert_eq!(d.line, line_of(&text, "[study]", 0));
}

#[test]
fn an_arm_with_an_unknown_model_is_reported_at_its_model_key() {
    let text = VALID.replacen("model = \"m\"", "model = \"nope\"", 1);
    let d = only_problem(&text);
    assert_eq!(d.line, line_of(&text, "model = \"nope\"", 0));
    assert_eq!(d.column, 1);
    assert!(d.message.contains("\"nope\""), "{d}");
    assert!(d.help.contains("use one of: m"), "{d}");
}

#[test]
fn a_weight_that_is_not_positive_is_reported() {
    for weight in ["0", "-1.5"] {
        let text = VALID.replace("weight = 2", &format!("weight = {weight}"));
        let d = only_problem(&text);
        assert_eq!(
            d.line,
            line_of(&text, &format!("weight = {weight}"), 0),
            "{d}"
        );
        assert!(d.message.contains("not positive"), "{d}");
    }
}

#[test]
fn duplicate_ids_point_at_the_second_one() {
    let text = VALID.replace("id = \"proactive\"", "id = \"base\"");
    let d = only_problem(&text);
    assert_eq!(d.line, line_of(&text, "id = \"base\"", 1));
    assert!(
        d.message.contains("duplicate id \"base\" in [[arms]]"),
        "{d}"
    );
}

#[test]
fn a_rating_scale_with_min_not_below_max_is_reported() {
    let text = VALID.replace("min = 1\nmax = 10", "min = 5\nmax = 5");
    let d = only_problem(&text);
    assert_eq!(d.line, line_of(&text, "max = 5", 0));
    assert!(d.message.contains("scale is empty"), "{d}");
}

#[test]
fn a_model_file_that_does_not_exist_is_reported_with_the_fix() {
    let text = VALID.replace("file = \"fake.gguf\"", "file = \"missing.gguf\"");
    let d = only_problem(&text);
    assert_eq!(d.line, line_of(&text, "missing.gguf", 0));
    assert!(d.message.contains("cannot be opened"), "{d}");
    assert!(d.help.contains("models fetch"), "{d}");
}

#[test]
fn a_file_that_is_not_gguf_is_reported() {
    let models = models_dir();
    std::fs::write(models.path().join("text.gguf"), b"hello").unwrap();
    let text = VALID.replace("fake.gguf", "text.gguf");
    let err =
        LoadedProtocol::from_text(Path::new("p.toml"), text.clone(), models.path()).unwrap_err();
    let d = &err.diagnostics()[0];
    assert!(d.message.contains("not a GGUF file"), "{d}");
    assert_eq!(d.line, line_of(&text, "text.gguf", 0));
}

#[test]
fn several_problems_are_reported_at_once_in_line_order() {
    let text = VALID
        .replacen("model = \"m\"", "model = \"nope\"", 1)
        .replace("weight = 2", "weight = 0")
        .replace(
            "id = \"a\"\ntitle",
            "id = \"a\"\ntitle = \"A\"\n[[tasks.topics]]\nid = \"a\"\ntitle",
        );
    let err = check(&text).unwrap_err();
    let lines: Vec<usize> = err.diagnostics().iter().map(|d| d.line).collect();
    assert_eq!(
        lines,
        vec![
            line_of(&text, "model = \"nope\"", 0),
            line_of(&text, "weight = 0", 0),
            line_of(&text, "id = \"a\"", 1),
        ],
        "{err}"
    );
    let shown = err.to_string();
    assert!(shown.starts_with("3 problems"), "{shown}");
    assert!(shown.contains("study.toml:"), "{shown}");
}

#[test]
fn a_missing_protocol_file_names_the_path() {
    let err =
        LoadedProtocol::load(Path::new("/nonexistent/x.toml"), Path::new("models")).unwrap_err();
    assert!(matches!(err, ProtocolError::Read { .. }));
    assert!(err.to_string().contains("/nonexistent/x.toml"), "{err}");
}

#[test]
fn a_periodic_rating_without_an_interval_is_reported() {
    let text = VALID.replace("every_turns = 3\n", "");
    let d = only_problem(&text);
    assert_eq!(d.line, line_of(&text, "when = \"periodic\"", 0));
}

#[test]
fn the_paper_protocol_reproduces_the_study_design() {
    let p = protocol("doc-cocreation.toml").protocol;
    let arms: Vec<&str> = p.arms.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(arms, ["base", "proactive", "collabllm"]);
    assert!(p.arms.iter().all(|a| a.weight == 1.0));
    let kinds: Vec<&str> = p.tasks.iter().map(|t| t.kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["blog post", "creative writing", "personal statement"]
    );
    for task in &p.tasks {
        assert!(task.topics.len() >= 5, "{} has too few topics", task.id);
        assert!(task.topics.iter().all(|t| !t.hidden_intent.is_empty()));
    }
    assert!(p.session.min_turns >= 8);
    assert_eq!(p.session.assignment, AssignmentMethod::PermutedBlocks);
    let periodic: Vec<_> = p
        .ratings
        .iter()
        .filter(|r| r.when == RatingWhen::Periodic)
        .collect();
    assert_eq!(periodic.len(), 1);
    assert_eq!(
        (periodic[0].every_turns, periodic[0].min, periodic[0].max),
        (Some(3), 1, 10)
    );
    let finals: Vec<&str> = p.final_ratings().iter().map(|r| r.id.as_str()).collect();
    assert_eq!(finals, ["document_quality", "overall_interaction"]);
    let questions: Vec<&str> = p.questionnaire.iter().map(|q| q.id.as_str()).collect();
    assert_eq!(questions, ["strengths", "weaknesses"]);
    assert_eq!(p.periodic_ratings_due(3).len(), 1);
    assert!(p.periodic_ratings_due(4).is_empty());
}

#[test]
fn the_quick_pilot_is_small() {
    let p = protocol("quick-pilot.toml").protocol;
    assert_eq!(p.arms.len(), 1);
    assert_eq!(p.session.min_turns, 2);
}

#[test]
fn a_protocol_file_on_disk_is_checked_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_temp(
        dir.path(),
        "broken.toml",
        &VALID.replace("weight = 2", "weight = 0"),
    );
    let models = models_dir();
    let err = LoadedProtocol::load(&path, models.path()).unwrap_err();
    assert!(
        err.to_string().contains(&format!("{}:", path.display())),
        "{err}"
    );
}

#[test]
fn collab_settings_are_checked_at_their_lines() {
    let text = format!(
        "{VALID}\n[collab]\njudge_model = \"nope\"\ncandidates = 1\nprompts = \"no-such-folder\"\n\n[collab.weights]\nbleu = nan\n"
    );
    let err = check(&text).expect_err("the protocol must be rejected");
    let d = err.diagnostics();
    assert_eq!(d.len(), 4, "{err}");
    assert!(d[0].message.contains("judge_model \"nope\""), "{err}");
    assert_eq!(d[0].line, line_of(&text, "judge_model", 0));
    assert!(d[0].help.contains("use one of: m"), "{err}");
    assert!(d[1].message.contains("candidates is 1"), "{err}");
    assert_eq!(d[1].line, line_of(&text, "candidates = 1", 0));
    assert!(d[2].message.contains("no-such-folder"), "{err}");
    assert!(d[3].message.contains("not a finite number"), "{err}");
}

#[test]
fn a_window_of_zero_is_the_single_turn_ablation_and_is_accepted() {
    let text = format!("{VALID}\n[collab]\nwindow = 0\n");
    let c = check(&text).unwrap().protocol.collab;
    assert_eq!(c.window, 0);
    // Zero rollouts per candidate, though, would score nothing.
    let err = check(&format!("{VALID}\n[collab]\nsamples = 0\n")).unwrap_err();
    assert!(err.to_string().contains("samples is 0"), "{err}");
}

#[test]
fn the_proactive_share_is_a_share() {
    let text = format!("{VALID}\n[collab]\nproactive_share = 1.5\n");
    let err = check(&text).unwrap_err();
    let d = err.diagnostics();
    assert!(d[0].message.contains("proactive_share 1.5"), "{err}");
    assert_eq!(d[0].line, line_of(&text, "proactive_share", 0));
    let ok = check(&format!("{VALID}\n[collab]\nproactive_share = 0.5\n")).unwrap();
    assert_eq!(ok.protocol.collab.proactive_share, 0.5);
}

#[test]
fn collab_settings_default_to_the_papers() {
    let c = check(VALID).unwrap().protocol.collab;
    assert_eq!((c.samples, c.window, c.candidates), (3, 2, 2));
    assert_eq!(c.margin, 0.02);
    assert_eq!(
        (
            c.weights.bleu,
            c.weights.tokens,
            c.weights.interactivity,
            c.weights.quality
        ),
        (1.0, -0.1, 1.0, 0.0)
    );
    let paper = protocol("doc-cocreation.toml").protocol;
    let judge = crate::common::JUDGE_MODEL_ID.to_string();
    assert_eq!(
        paper.collab_models(),
        (judge.clone(), judge.clone()),
        "the example protocol names the fetched judge as judge and simulated user"
    );
    let roles_aside = collabllm::protocol::CollabSpec {
        simulator_model: None,
        judge_model: None,
        ..paper.collab
    };
    assert_eq!(
        roles_aside, c,
        "the example protocol spells out the defaults"
    );
    // Without its roles, the judge is the first arm's model.
    assert_eq!(
        c.judge_model.as_deref().unwrap_or(&paper.arms[0].model),
        "smollm2-135m"
    );
}

/// A model only the CollabLLM core uses may be absent (serve does not load it); a model an arm
/// uses may not.
#[test]
fn only_the_arms_models_must_be_present() {
    let judge = "[[models]]\nid = \"judge\"\nfile = \"absent-judge.gguf\"\n";
    let ok = check(&format!(
        "{VALID}\n{judge}\n[collab]\njudge_model = \"judge\"\n"
    ));
    assert!(ok.is_ok(), "{:?}", ok.err().map(|e| e.to_string()));
    let served = format!("{VALID}\n{judge}").replacen("model = \"m\"", "model = \"judge\"", 1);
    let err = check(&served).unwrap_err().to_string();
    assert!(
        err.contains("absent-judge.gguf") && err.contains("models fetch"),
        "{err}"
    );
}

#[test]
fn reward_weights_follow_a_named_preset_with_overrides() {
    let weights = |table: &str| {
        let w = check(&format!("{VALID}\n[collab.weights]\n{table}\n"))
            .unwrap()
            .protocol
            .collab
            .weights;
        (w.bleu, w.tokens, w.interactivity, w.quality)
    };
    // The paper's released document configuration weights no interactivity.
    assert_eq!(
        weights("preset = \"collabllm-document\""),
        (1.0, -0.1, 0.0, 0.0)
    );
    assert_eq!(weights("preset = \"studio\""), (1.0, -0.1, 1.0, 0.5));
    // A weight written beside the preset overrides it; the others stay the preset's.
    assert_eq!(
        weights("preset = \"collabllm-document\"\ntokens = -0.5"),
        (1.0, -0.5, 0.0, 0.0)
    );
    // Without a preset a table overrides the recipe's defaults.
    assert_eq!(weights("quality = 0.25"), (1.0, -0.1, 1.0, 0.25));
    // An unknown preset is reported at its line with the names there are.
    let text = format!("{VALID}\n[collab.weights]\npreset = \"paper\"\n");
    let d = only_problem(&text);
    assert_eq!(d.line, line_of(&text, "preset", 0));
    assert!(
        d.message.contains("collabllm-recipe") && d.message.contains("studio"),
        "{d}"
    );
}
