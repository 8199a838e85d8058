//! The prompts of the simulator and the judge: minijinja templates a researcher can change. A
//! protocol's `[collab] prompts` folder overrides the built-in ones file by file.

use std::collections::BTreeMap;
use std::path::Path;

use super::CollabError;
use crate::protocol::sha256_hex;

/// The built-in prompts (`study-protocols/prompts/`).
const BUILT_IN: [(&str, &str); 6] = [
    (
        "user_simulator.md",
        include_str!("../../study-protocols/prompts/user_simulator.md"),
    ),
    (
        "user_rating.md",
        include_str!("../../study-protocols/prompts/user_rating.md"),
    ),
    (
        "judge_interactivity.md",
        include_str!("../../study-protocols/prompts/judge_interactivity.md"),
    ),
    (
        "judge_document.md",
        include_str!("../../study-protocols/prompts/judge_document.md"),
    ),
    (
        "judge_quality.md",
        include_str!("../../study-protocols/prompts/judge_quality.md"),
    ),
    (
        "proactive.md",
        include_str!("../../study-protocols/prompts/proactive.md"),
    ),
];

#[derive(Debug, Clone)]
pub struct Prompts {
    templates: BTreeMap<&'static str, String>,
}

impl Prompts {
    /// The built-in prompts, with the files of `dir` in their place where it has them.
    pub fn load(dir: Option<&Path>) -> Result<Self, CollabError> {
        if let Some(dir) = dir.filter(|d| !d.is_dir()) {
            return Err(CollabError::Prompt {
                name: dir.display().to_string(),
                reason: "the [collab] prompts folder does not exist (it is found next to the \
                         protocol file as imported); restore it or remove `prompts`"
                    .into(),
            });
        }
        let mut templates = BTreeMap::new();
        for (name, text) in BUILT_IN {
            let path = dir.map(|d| d.join(name)).filter(|p| p.is_file());
            let text = match path {
                Some(path) => std::fs::read_to_string(&path).map_err(|e| CollabError::Prompt {
                    name: path.display().to_string(),
                    reason: e.to_string(),
                })?,
                None => text.to_string(),
            };
            // Catch template syntax errors now rather than in the middle of a run.
            minijinja::Environment::new()
                .template_from_str(&text)
                .map_err(|e| CollabError::Prompt {
                    name: name.into(),
                    reason: e.to_string(),
                })?;
            templates.insert(name, text);
        }
        Ok(Self { templates })
    }

    pub fn render(&self, name: &str, context: minijinja::Value) -> Result<String, CollabError> {
        let text = self
            .templates
            .get(name)
            .ok_or_else(|| CollabError::Prompt {
                name: name.into(),
                reason: "no such prompt".into(),
            })?;
        minijinja::Environment::new()
            .render_str(text, context)
            .map_err(|e| CollabError::Prompt {
                name: name.into(),
                reason: e.to_string(),
            })
    }

    /// sha256 of all prompts, for the provenance of what they produced.
    pub fn sha256(&self) -> String {
        let joined: String = self
            .templates
            .iter()
            .map(|(name, text)| format!("{name}\0{text}\0"))
            .collect();
        sha256_hex(joined.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_overrides_prompts_file_by_file() {
        let built_in = Prompts::load(None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("judge_quality.md"), "Rate {{ document }}.").unwrap();
        let custom = Prompts::load(Some(dir.path())).unwrap();
        let rendered = custom
            .render("judge_quality.md", minijinja::context! { document => "it" })
            .unwrap();
        assert_eq!(rendered, "Rate it.");
        assert_eq!(
            custom.templates["user_simulator.md"],
            built_in.templates["user_simulator.md"]
        );
        assert_ne!(custom.sha256(), built_in.sha256());
    }

    #[test]
    fn a_missing_folder_or_a_broken_template_is_an_error() {
        let missing = Prompts::load(Some(Path::new("/no/such/prompts"))).unwrap_err();
        assert!(
            missing.to_string().contains("/no/such/prompts"),
            "{missing}"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("user_rating.md"), "{% if %}").unwrap();
        let broken = Prompts::load(Some(dir.path())).unwrap_err();
        assert!(broken.to_string().contains("user_rating.md"), "{broken}");
    }
}
