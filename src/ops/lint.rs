//! Checks a registry template against Meta's documented reasons for refusing a template, before
//! `kabar templates push` submits it: a refusal costs the operator a day. Pure.

use crate::templates::{Category, MAX_BODY_CHARS, Template, check_param_text};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Meta would refuse it (or price it as marketing): not submitted.
    Error,
    /// Worth a look; submitted anyway.
    Warning,
}

/// One problem, with what to change.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub problem: String,
}

fn error(problem: impl Into<String>) -> Finding {
    Finding {
        severity: Severity::Error,
        problem: problem.into(),
    }
}

fn warning(problem: impl Into<String>) -> Finding {
    Finding {
        severity: Severity::Warning,
        problem: problem.into(),
    }
}

/// The longest an AUTHENTICATION code may be shown as valid in its footer (Meta: 1 to 90).
pub const MAX_CODE_EXPIRATION_MINUTES: u64 = 90;

/// Words that make a UTILITY text read as promotional: Meta refuses such a template or moves it
/// to MARKETING, which costs more per message.
const PROMOTIONAL: &[&str] = &[
    "promo",
    "promosi",
    "diskon",
    "gratis",
    "hadiah",
    "penawaran",
    "cashback",
    "voucher",
    "undian",
    "spesial",
    "discount",
    "free",
    "offer",
    "sale",
    "deal",
    "bonus",
];

/// Link shorteners Meta refuses in templates.
const SHORTENERS: &[&str] = &[
    "bit.ly",
    "tinyurl.com",
    "goo.gl",
    "t.co",
    "ow.ly",
    "s.id",
    "is.gd",
    "cutt.ly",
];

/// A `{{...}}` in a body: where it is and what is inside.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Placeholder {
    start: usize,
    end: usize,
    inner: String,
}

fn placeholders(body: &str) -> Result<Vec<Placeholder>, String> {
    let mut found = Vec::new();
    let mut rest = 0;
    while let Some(open) = body[rest..].find("{{") {
        let start = rest + open;
        let Some(close) = body[start + 2..].find("}}") else {
            return Err(format!(
                "`{{{{` at character {start} is never closed with `}}}}`"
            ));
        };
        let end = start + 2 + close + 2;
        found.push(Placeholder {
            start,
            end,
            inner: body[start + 2..end - 2].to_owned(),
        });
        rest = end;
    }
    Ok(found)
}

fn has_word(text: &str) -> bool {
    text.chars().any(char::is_alphanumeric)
}

/// Words of the fixed text (outside the parameters).
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric() && c != '.')
        .map(|w| w.trim_matches('.').to_lowercase())
        .filter(|w| !w.is_empty())
        .collect()
}

/// The number of distinct positional parameters (`{{1}}`, `{{2}}`, ...) in a body as Meta holds
/// it; `None` when the body uses anything else (named parameters).
pub fn positional_count(body: &str) -> Option<usize> {
    let mut numbers = std::collections::BTreeSet::new();
    for p in placeholders(body).ok()? {
        numbers.insert(p.inner.trim().parse::<usize>().ok()?);
    }
    Some(numbers.len())
}

/// Everything Meta is known to refuse in `template`; `code_expiration_minutes` is what an
/// AUTHENTICATION template would show (from `KABAR_OTP_TTL_SECONDS`).
pub fn lint(template: &Template, code_expiration_minutes: u64) -> Vec<Finding> {
    let mut findings = Vec::new();
    if template.category == Category::Authentication {
        if template.body.is_some() {
            findings.push(warning(
                "an AUTHENTICATION template's body is written by Meta; the body text is not sent",
            ));
        }
        if !(1..=MAX_CODE_EXPIRATION_MINUTES).contains(&code_expiration_minutes) {
            findings.push(error(format!(
                "the code expiry would be {code_expiration_minutes} minutes; Meta accepts 1 to \
                 {MAX_CODE_EXPIRATION_MINUTES} (set KABAR_OTP_TTL_SECONDS between 60 and 5400)"
            )));
        }
        return findings;
    }
    let Some(body) = template.body.as_deref() else {
        findings.push(error(
            "has no body text: add `body = \"...\"` with {{1}}..{{n}} to its [templates.KEY] \
             table in KABAR_TEMPLATES",
        ));
        return findings;
    };
    let n = template.params.len();
    let length = body.chars().count();
    if length > MAX_BODY_CHARS {
        findings.push(error(format!(
            "the body is {length} characters; Meta allows {MAX_BODY_CHARS}"
        )));
    }
    let found = match placeholders(body) {
        Ok(found) => found,
        Err(e) => {
            findings.push(error(format!("the body has a broken parameter: {e}")));
            return findings;
        }
    };
    let mut numbers = Vec::new();
    for p in &found {
        match p.inner.parse::<usize>() {
            Ok(k) if k >= 1 && p.inner == k.to_string() => numbers.push(k),
            _ => findings.push(error(format!(
                "`{{{{{}}}}}` is not a parameter: write {{{{1}}}}..{{{{{n}}}}}",
                p.inner
            ))),
        }
    }
    let mut distinct = numbers.clone();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() != numbers.len() {
        findings.push(error(
            "a parameter appears twice in the body; use each of {{1}}..{{n}} once",
        ));
    }
    if distinct != (1..=n).collect::<Vec<_>>() {
        findings.push(error(format!(
            "the body has {} parameters ({}) but the registry lists {n} ({}): they must be \
             {{{{1}}}}..{{{{{n}}}}}, in the registry's order (Meta error 132000 at send time)",
            distinct.len(),
            distinct
                .iter()
                .map(|k| format!("{{{{{k}}}}}"))
                .collect::<Vec<_>>()
                .join(" "),
            template.params.join(", ")
        )));
    }
    if let (Some(first), Some(last)) = (found.first(), found.last()) {
        if !has_word(&body[..first.start]) {
            findings.push(error(
                "the body starts with a parameter; Meta refuses that: begin with a word, e.g. \
                 \"Halo {{1}}\"",
            ));
        }
        if !has_word(&body[last.end..]) {
            findings.push(error(
                "the body ends with a parameter; Meta refuses that: end with a word, e.g. \
                 \"Terima kasih.\"",
            ));
        }
    }
    for pair in found.windows(2) {
        if !has_word(&body[pair[0].end..pair[1].start]) {
            findings.push(error(format!(
                "`{{{{{}}}}}` and `{{{{{}}}}}` stand side by side; Meta refuses parameters \
                 without words between them",
                pair[0].inner, pair[1].inner
            )));
        }
    }
    let mut fixed = String::with_capacity(body.len());
    let mut at = 0;
    for p in &found {
        fixed.push_str(&body[at..p.start]);
        fixed.push(' ');
        at = p.end;
    }
    fixed.push_str(&body[at..]);
    let fixed_words = words(&fixed);
    if n > 0 && fixed_words.len() < 3 * n {
        findings.push(warning(format!(
            "{} words for {n} parameters: Meta refuses bodies with too many parameters for \
             their length; aim for at least {} words",
            fixed_words.len(),
            3 * n
        )));
    }
    if template.examples.len() != n {
        findings.push(error(format!(
            "{} examples for {n} parameters: add `examples = [...]` with one realistic value \
             per parameter (Meta refuses a template without them)",
            template.examples.len()
        )));
    } else {
        for (i, example) in template.examples.iter().enumerate() {
            if let Err(e) = check_param_text(example) {
                findings.push(error(format!("example {} {e}", i + 1)));
            } else if example.trim() == "-" {
                findings.push(error(format!(
                    "example {} is a placeholder: give a realistic value",
                    i + 1
                )));
            }
        }
    }
    let lower = body.to_lowercase();
    if let Some(short) = SHORTENERS.iter().find(|s| {
        fixed_words
            .iter()
            .any(|w| w == *s || w.ends_with(&format!("/{s}")))
    }) {
        findings.push(error(format!(
            "links through {short} are refused by Meta: link to your own domain"
        )));
    } else if lower.contains("http://") || lower.contains("https://") || lower.contains("www.") {
        findings.push(warning(
            "the body holds a link: Meta reviews links closely; use your own domain, never a \
             shortener",
        ));
    }
    if template.category == Category::Utility {
        let promotional: Vec<&str> = PROMOTIONAL
            .iter()
            .copied()
            .filter(|p| fixed_words.iter().any(|w| w == p))
            .collect();
        if !promotional.is_empty() {
            findings.push(error(format!(
                "reads as promotional ({}): Meta refuses such a UTILITY template or makes it \
                 MARKETING, which costs more per message; keep it about the customer's bill",
                promotional.join(", ")
            )));
        }
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::templates::TemplateRegistry;

    fn utility(body: &str, params: &[&str], examples: &[&str]) -> Template {
        Template {
            key: "t".into(),
            name: "t".into(),
            language: "id".into(),
            category: Category::Utility,
            params: params.iter().map(|p| (*p).to_owned()).collect(),
            body: Some(body.to_owned()),
            examples: examples.iter().map(|p| (*p).to_owned()).collect(),
        }
    }

    fn problems(t: &Template) -> Vec<String> {
        lint(t, 5)
            .into_iter()
            .filter(|f| f.severity == Severity::Error)
            .map(|f| f.problem)
            .collect()
    }

    #[test]
    fn the_built_in_seven_pass_without_findings() {
        let registry = TemplateRegistry::default();
        assert_eq!(registry.all().len(), 7);
        for t in registry.all() {
            assert_eq!(lint(t, 5), vec![], "{}", t.key);
        }
    }

    #[test]
    fn parameters_at_the_edges_or_side_by_side_are_refused() {
        let t = utility(
            "{{1}}, tagihan Anda sebesar {{2}} sudah terbit untuk bulan ini {{3}}",
            &["a", "b", "c"],
            &["Budi", "Rp 1", "Mei"],
        );
        let p = problems(&t).join("\n");
        assert!(p.contains("starts with a parameter"), "{p}");
        assert!(p.contains("ends with a parameter"), "{p}");
        let t = utility(
            "Halo {{1}} {{2}}, tagihan Anda untuk bulan ini sudah terbit. Terima kasih.",
            &["a", "b"],
            &["Budi", "Santoso"],
        );
        assert!(problems(&t).join("\n").contains("side by side"));
        // Punctuation alone after the last parameter is no word.
        let t = utility(
            "Halo pelanggan, tagihan Anda bulan ini sebesar {{1}}.",
            &["a"],
            &["Rp 1"],
        );
        assert!(problems(&t).join("\n").contains("ends with a parameter"));
    }

    #[test]
    fn parameters_must_match_the_registry() {
        let t = utility(
            "Halo {{1}}, tagihan Anda sebesar {{3}} sudah terbit. Terima kasih banyak ya.",
            &["a", "b"],
            &["Budi", "Rp 1"],
        );
        assert!(problems(&t).join("\n").contains("registry lists 2"));
        let t = utility(
            "Halo {{nama}}, tagihan Anda sudah terbit bulan ini. Terima kasih.",
            &["nama"],
            &["Budi"],
        );
        assert!(problems(&t).join("\n").contains("is not a parameter"));
        let t = utility(
            "Halo {{1}, tagihan Anda sudah terbit. Terima kasih.",
            &["a"],
            &["x"],
        );
        assert!(problems(&t).join("\n").contains("never closed"));
    }

    #[test]
    fn examples_are_required_and_real() {
        let body = "Halo {{1}}, tagihan Anda bulan ini sudah terbit. Terima kasih.";
        assert!(
            problems(&utility(body, &["a"], &[]))
                .join("\n")
                .contains("0 examples for 1")
        );
        assert!(
            problems(&utility(body, &["a"], &["-"]))
                .join("\n")
                .contains("placeholder")
        );
        assert!(
            problems(&utility(body, &["a"], &["a\nb"]))
                .join("\n")
                .contains("line break")
        );
        assert_eq!(
            problems(&utility(body, &["a"], &["Budi"])),
            Vec::<String>::new()
        );
    }

    #[test]
    fn too_many_parameters_for_the_words_is_a_warning() {
        let t = utility(
            "Halo {{1}} dan {{2}} serta {{3}} oke.",
            &["a", "b", "c"],
            &["x", "y", "z"],
        );
        let all = lint(&t, 5);
        assert!(
            all.iter()
                .any(|f| f.severity == Severity::Warning && f.problem.contains("words for 3")),
            "{all:?}"
        );
    }

    #[test]
    fn promotion_and_shorteners_in_utility_are_refused() {
        let t = utility(
            "Halo {{1}}, dapatkan diskon untuk tagihan bulan ini di bit.ly/abc sekarang juga.",
            &["a"],
            &["Budi"],
        );
        let p = problems(&t).join("\n");
        assert!(p.contains("promotional (diskon)"), "{p}");
        assert!(p.contains("bit.ly"), "{p}");
        let mut marketing = t.clone();
        marketing.category = Category::Marketing;
        assert!(!problems(&marketing).join("\n").contains("promotional"));
    }

    #[test]
    fn an_authentication_code_expiry_must_fit_meta() {
        let registry = TemplateRegistry::default();
        let otp = registry.get("otp_code").unwrap();
        assert_eq!(lint(otp, 5), vec![]);
        assert_eq!(problems_at(otp, 0).len(), 1);
        assert_eq!(problems_at(otp, 91).len(), 1);
    }

    fn problems_at(t: &Template, minutes: u64) -> Vec<Finding> {
        lint(t, minutes)
    }

    #[test]
    fn positional_counts_read_metas_bodies() {
        assert_eq!(
            positional_count("*{{1}}* is your verification code."),
            Some(1)
        );
        assert_eq!(positional_count("Halo {{1}}, {{2}} dan {{1}}"), Some(2));
        assert_eq!(positional_count("no parameters"), Some(0));
        assert_eq!(positional_count("Halo {{nama}}"), None);
    }
}
