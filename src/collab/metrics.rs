//! The task metric of a conversation: word-level sentence BLEU of the final document against the
//! goal document, as sacreBLEU's `sentence_bleu` computes it by default: the `13a` tokeniser (the
//! one of WMT's `mteval-v13a.pl`), case-sensitive, n-grams up to 4, `exp` smoothing and effective
//! order. The result is on a 0–1 scale (sacreBLEU prints it ×100). The original CollabLLM code
//! passed strings where lists of words were expected and so scored characters; this scores words.

use std::collections::HashMap;

const MAX_ORDER: usize = 4;

/// sacreBLEU's `13a` tokenisation of one segment.
pub fn tokenize_13a(text: &str) -> Vec<String> {
    let mut line = text
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if line.contains('&') {
        line = line
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    // ASCII punctuation and symbols, except the apostrophe, comma, hyphen and period, stand alone.
    let mut spaced = String::with_capacity(line.len() + 16);
    spaced.push(' ');
    for c in line.chars() {
        if matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/') {
            spaced.push(' ');
            spaced.push(c);
            spaced.push(' ');
        } else {
            spaced.push(c);
        }
    }
    spaced.push(' ');
    let is_mark = |c: char| c == '.' || c == ',';
    // Periods and commas stand alone unless preceded by a digit …
    let spaced = rewrite_pairs(
        &spaced,
        |a, b| !a.is_ascii_digit() && is_mark(b),
        |a, b| format!("{a} {b} "),
    );
    // … or unless followed by one; a hyphen after a digit stands alone.
    let spaced = rewrite_pairs(
        &spaced,
        |a, b| is_mark(a) && !b.is_ascii_digit(),
        |a, b| format!(" {a} {b}"),
    );
    let spaced = rewrite_pairs(
        &spaced,
        |a, b| a.is_ascii_digit() && b == '-',
        |a, b| format!("{a} {b} "),
    );
    spaced.split_whitespace().map(str::to_string).collect()
}

/// Replaces every non-overlapping pair of characters that `matches`, scanning left to right the
/// way a regular expression substitution does.
fn rewrite_pairs(
    text: &str,
    matches: impl Fn(char, char) -> bool,
    replace: impl Fn(char, char) -> String,
) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len() + 16);
    let mut i = 0;
    while i < chars.len() {
        if i + 1 < chars.len() && matches(chars[i], chars[i + 1]) {
            out.push_str(&replace(chars[i], chars[i + 1]));
            i += 2;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

fn ngrams(tokens: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut counts = HashMap::new();
    for gram in tokens.windows(n) {
        *counts.entry(gram).or_insert(0) += 1;
    }
    counts
}

/// Sentence BLEU (0–1) of `hypothesis` against one `reference`.
pub fn sentence_bleu(hypothesis: &str, reference: &str) -> f64 {
    let hyp = tokenize_13a(hypothesis);
    let reference = tokenize_13a(reference);
    if hyp.is_empty() {
        return 0.0;
    }
    let stats: Vec<(usize, usize)> = (1..=MAX_ORDER)
        .map(|n| {
            let reference_counts = ngrams(&reference, n);
            let correct = ngrams(&hyp, n)
                .iter()
                .map(|(gram, count)| (*count).min(reference_counts.get(gram).copied().unwrap_or(0)))
                .sum();
            (correct, hyp.len().saturating_sub(n - 1))
        })
        .collect();
    if stats.iter().all(|(correct, _)| *correct == 0) {
        return 0.0;
    }
    let mut log_sum = 0.0;
    let mut order = 0;
    let mut smooth = 1.0;
    for &(correct, total) in stats.iter().take_while(|(_, total)| *total > 0) {
        // Effective order: only the orders the hypothesis is long enough for count.
        order += 1;
        let precision = if correct == 0 {
            smooth *= 2.0;
            1.0 / (smooth * total as f64)
        } else {
            correct as f64 / total as f64
        };
        log_sum += precision.ln();
    }
    let (h, r) = (hyp.len() as f64, reference.len() as f64);
    let brevity = if h < r { (1.0 - r / h).exp() } else { 1.0 };
    brevity * (log_sum / order as f64).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenises_like_13a() {
        assert_eq!(
            tokenize_13a("Hello, world! It's 3.5 km (2-3 hours)."),
            [
                "Hello", ",", "world", "!", "It's", "3.5", "km", "(", "2", "-", "3", "hours", ")",
                "."
            ]
        );
        assert_eq!(tokenize_13a("a &amp; b-c"), ["a", "&", "b-c"]);
    }

    #[test]
    fn identical_text_scores_one() {
        let text = "The keeper climbs the stairs one last time.";
        assert!((sentence_bleu(text, text) - 1.0).abs() < 1e-12);
        assert_eq!(sentence_bleu("", text), 0.0);
    }

    /// Values printed by sacreBLEU 2 (`sacrebleu.sentence_bleu(hyp, [ref]).score / 100`).
    #[test]
    fn matches_sacrebleu() {
        let cases = [
            ("The cat sat on the mat.", "The cat is sitting on the mat.", 0.4238365628278778),
            (
                "Thanks so much for watering my plants, the tomatoes look great!",
                "Thank you for watering the plants during my two-week holiday; the tomatoes are thriving.",
                0.07676649116452062,
            ),
            ("short", "a much longer reference text here", 0.0),
            (
                "Hello, world! It's 3.5 km (2-3 hours).",
                "Hello world, it is 3.5 km.",
                0.07474875887495341,
            ),
        ];
        for (hyp, reference, expected) in cases {
            let got = sentence_bleu(hyp, reference);
            assert!(
                (got - expected).abs() < 1e-9,
                "{hyp:?}: {got} vs {expected}"
            );
        }
    }
}
