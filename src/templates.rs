//! The template registry: which approved Meta template serves each notification kind, in which
//! language, and the names of its `{{1}}..{{n}}` parameters in order.
//!
//! The seven billing templates are built in; an ISP's TOML file (`KABAR_TEMPLATES`) renames them to
//! its own approved names, changes their language or parameter order, or adds new ones. Everything
//! is resolved once at start-up; a request only looks a key up.

use std::{collections::HashMap, sync::Arc};

use serde::{Deserialize, Serialize};

/// Meta's template categories (they decide price and rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Category {
    Utility,
    Authentication,
    Marketing,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// Registry key the callers use, e.g. `invoice_notification`.
    pub key: String,
    /// The approved template name in WhatsApp Manager.
    pub name: String,
    /// Meta language code, e.g. `id` or `en_US`.
    pub language: String,
    pub category: Category,
    /// Parameter names; position i fills `{{i+1}}`.
    pub params: Vec<String>,
    /// The body text submitted to Meta by `kabar templates push`, with `{{1}}..{{n}}` in the
    /// order of `params`. `None` for AUTHENTICATION (Meta writes that body itself) and for a
    /// template only ever created in WhatsApp Manager.
    pub body: Option<String>,
    /// One example value per parameter, in order, submitted with the body (Meta requires them).
    pub examples: Vec<String>,
}

/// Meta refuses a body over 1024 characters; a single parameter can never be longer.
pub const MAX_PARAM_CHARS: usize = 1024;
/// Meta's limit on the whole rendered body; the parameters alone must fit in it.
pub const MAX_BODY_CHARS: usize = 1024;
/// An authentication code may be at most 15 characters (Meta).
pub const MAX_OTP_CODE_CHARS: usize = 15;

/// The built-in templates: key, category, parameters in order, and the Indonesian body text
/// `kabar templates push` submits (written for kabar; `{{n}}` is the n-th parameter).
const DEFAULTS: &[(&str, Category, &[&str], Option<&str>)] = &[
    (
        "payment_confirmation",
        Category::Utility,
        &["nama", "nominal", "no_bayar", "tanggal", "status"],
        Some(
            "Halo {{1}}, pembayaran sebesar {{2}} dengan nomor pembayaran {{3}} pada tanggal \
             {{4}} sudah kami terima dengan status {{5}}. Terima kasih atas pembayaran Anda.",
        ),
    ),
    (
        "invoice_notification",
        Category::Utility,
        &[
            "nama",
            "periode",
            "no_invoice",
            "paket",
            "nominal",
            "jatuh_tempo",
            "customer_id",
        ],
        Some(
            "Halo {{1}}, tagihan internet Anda untuk periode {{2}} sudah terbit. Nomor tagihan: \
             {{3}}. Paket: {{4}}. Jumlah tagihan: {{5}}. Mohon lakukan pembayaran sebelum \
             {{6}}. ID pelanggan Anda: {{7}}. Terima kasih.",
        ),
    ),
    (
        "payment_reminder",
        Category::Utility,
        &["nama", "nominal", "hari_sblm_jatuh_tempo", "customer_id"],
        Some(
            "Halo {{1}}, kami mengingatkan bahwa tagihan internet Anda sebesar {{2}} akan jatuh \
             tempo dalam {{3}} hari. Mohon lakukan pembayaran agar layanan tetap aktif. ID \
             pelanggan: {{4}}. Terima kasih.",
        ),
    ),
    (
        "overdue_notice",
        Category::Utility,
        &["nama", "nominal", "customer_id"],
        Some(
            "Halo {{1}}, tagihan internet Anda sebesar {{2}} telah melewati tanggal jatuh tempo. \
             Mohon segera lakukan pembayaran agar layanan tidak terganggu. ID pelanggan: {{3}}. \
             Terima kasih.",
        ),
    ),
    (
        "isolation_notice",
        Category::Utility,
        &["nama", "nominal", "telepon_cs", "customer_id"],
        Some(
            "Halo {{1}}, layanan internet Anda untuk sementara kami isolir karena tagihan sebesar \
             {{2}} belum kami terima. Layanan aktif kembali setelah pembayaran diterima. Hubungi \
             layanan pelanggan di {{3}} bila ada pertanyaan. ID pelanggan: {{4}}. Terima kasih.",
        ),
    ),
    (
        "access_opened",
        Category::Utility,
        &["nama", "telepon_cs"],
        Some(
            "Halo {{1}}, pembayaran Anda sudah kami terima dan akses internet Anda telah dibuka \
             kembali. Bila masih ada kendala, hubungi layanan pelanggan di {{2}}. Terima kasih.",
        ),
    ),
    // Meta writes an AUTHENTICATION template's body itself ("<code> is your verification code").
    ("otp_code", Category::Authentication, &["kode_otp"], None),
];

/// The default language of every built-in template.
pub const DEFAULT_LANGUAGE: &str = "id";

#[derive(Debug, Clone)]
pub struct TemplateRegistry {
    templates: HashMap<String, Arc<Template>>,
}

/// One `[templates.KEY]` table of the TOML registry. Every field is optional for a built-in key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateOverride {
    name: Option<String>,
    language: Option<String>,
    category: Option<Category>,
    params: Option<Vec<String>>,
    body: Option<String>,
    examples: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    #[serde(default)]
    templates: HashMap<String, TemplateOverride>,
}

impl Default for TemplateRegistry {
    fn default() -> Self {
        let templates = DEFAULTS
            .iter()
            .map(|(key, category, params, body)| {
                let template = Template {
                    key: (*key).to_owned(),
                    name: (*key).to_owned(),
                    language: DEFAULT_LANGUAGE.to_owned(),
                    category: *category,
                    params: params.iter().map(|p| (*p).to_owned()).collect(),
                    body: body.map(str::to_owned),
                    examples: params.iter().map(|p| sample_value(p).to_owned()).collect(),
                };
                ((*key).to_owned(), Arc::new(template))
            })
            .collect();
        TemplateRegistry { templates }
    }
}

impl TemplateRegistry {
    /// The built-in registry with the overrides of a TOML document applied.
    ///
    /// ```toml
    /// [templates.invoice_notification]
    /// name = "tagihan_internet_v2"
    /// language = "id"
    ///
    /// [templates.welcome]            # a new key needs category and params
    /// category = "UTILITY"
    /// params = ["nama", "paket"]
    /// # for `kabar templates push`:
    /// body = "Halo {{1}}, selamat datang di paket {{2}}. Terima kasih."
    /// examples = ["Budi", "Internet 20 Mbps"]
    /// ```
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let file: RegistryFile = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        let mut registry = TemplateRegistry::default();
        let mut keys: Vec<_> = file.templates.into_iter().collect();
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, over) in keys {
            if !is_meta_name(&key) {
                return Err(format!(
                    "template key {key:?} must be lowercase letters, digits and underscores"
                ));
            }
            let base = registry.templates.get(&key).map(|t| (**t).clone());
            let template = match base {
                Some(mut t) => {
                    if let Some(name) = over.name {
                        t.name = name;
                    }
                    if let Some(language) = over.language {
                        t.language = language;
                    }
                    if let Some(category) = over.category {
                        t.category = category;
                    }
                    if let Some(params) = over.params {
                        // The built-in text and examples follow the built-in order only.
                        if over.body.is_none() && params != t.params {
                            t.body = None;
                        }
                        t.examples = params.iter().map(|p| sample_value(p).to_owned()).collect();
                        t.params = params;
                    }
                    if let Some(body) = over.body {
                        t.body = Some(body);
                    }
                    if let Some(examples) = over.examples {
                        t.examples = examples;
                    }
                    t
                }
                None => Template {
                    name: over.name.unwrap_or_else(|| key.clone()),
                    language: over.language.unwrap_or_else(|| DEFAULT_LANGUAGE.to_owned()),
                    category: over.category.ok_or_else(|| {
                        format!("template {key:?} is not built in, so it needs a category")
                    })?,
                    params: over.params.ok_or_else(|| {
                        format!("template {key:?} is not built in, so it needs params")
                    })?,
                    body: over.body,
                    examples: over.examples.unwrap_or_default(),
                    key: key.clone(),
                },
            };
            validate_template(&template)?;
            registry.templates.insert(key, Arc::new(template));
        }
        Ok(registry)
    }

    pub fn get(&self, key: &str) -> Option<&Arc<Template>> {
        self.templates.get(key)
    }

    /// Every template, in key order.
    pub fn all(&self) -> Vec<&Arc<Template>> {
        let mut all: Vec<&Arc<Template>> = self.templates.values().collect();
        all.sort_by(|a, b| a.key.cmp(&b.key));
        all
    }

    /// Registry keys in alphabetical order (for error messages and `send-test`).
    pub fn keys(&self) -> Vec<&str> {
        let mut keys: Vec<&str> = self.templates.keys().map(String::as_str).collect();
        keys.sort_unstable();
        keys
    }
}

fn validate_template(t: &Template) -> Result<(), String> {
    if !is_meta_name(&t.name) {
        return Err(format!(
            "template {:?}: Meta template name {:?} must be lowercase letters, digits and underscores",
            t.key, t.name
        ));
    }
    if !is_language_code(&t.language) {
        return Err(format!(
            "template {:?}: language {:?} is not a Meta language code such as id or en_US",
            t.key, t.language
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for p in &t.params {
        if p.is_empty() || !seen.insert(p.as_str()) {
            return Err(format!(
                "template {:?}: parameter names must be non-empty and distinct",
                t.key
            ));
        }
    }
    if !t.examples.is_empty() && t.examples.len() != t.params.len() {
        return Err(format!(
            "template {:?}: {} examples for {} parameters: give one example per parameter",
            t.key,
            t.examples.len(),
            t.params.len()
        ));
    }
    if t.category == Category::Authentication && t.params.len() != 1 {
        return Err(format!(
            "template {:?}: an AUTHENTICATION template has exactly one parameter (the code)",
            t.key
        ));
    }
    Ok(())
}

fn is_meta_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 512
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// `id`, `en`, `en_US`, `zh_CN`, `fil`.
pub fn is_language_code(s: &str) -> bool {
    let (lang, region) = match s.split_once('_') {
        Some((l, r)) => (l, Some(r)),
        None => (s, None),
    };
    (2..=3).contains(&lang.len())
        && lang.bytes().all(|b| b.is_ascii_lowercase())
        && region.is_none_or(|r| r.len() == 2 && r.bytes().all(|b| b.is_ascii_uppercase()))
}

/// Checks one parameter's text the way Meta will (error 132018 and the length limits), so a bad
/// value is refused before it costs a call. Returns the problem in words.
pub fn check_param_text(text: &str) -> Result<(), String> {
    if text.trim().is_empty() {
        return Err("must not be empty".to_owned());
    }
    if text.contains([
        '\n', '\r', '\u{0b}', '\u{0c}', '\u{85}', '\u{2028}', '\u{2029}',
    ]) {
        return Err("must not contain a line break (Meta error 132018)".to_owned());
    }
    if text.contains('\t') {
        return Err("must not contain a tab (Meta error 132018)".to_owned());
    }
    if text.chars().any(char::is_control) {
        return Err("must not contain control characters".to_owned());
    }
    let mut run = 0;
    for c in text.chars() {
        run = if c.is_whitespace() { run + 1 } else { 0 };
        if run > 4 {
            return Err(
                "must not contain more than 4 consecutive spaces (Meta error 132018)".to_owned(),
            );
        }
    }
    let chars = text.chars().count();
    if chars > MAX_PARAM_CHARS {
        return Err(format!(
            "is {chars} characters; Meta allows at most {MAX_PARAM_CHARS}"
        ));
    }
    Ok(())
}

/// A plausible value for a parameter of the built-in templates, for `kabar send-test` and demos.
pub fn sample_value(param: &str) -> &'static str {
    match param {
        "nama" => "Pelanggan Uji",
        "nominal" => "Rp 150.000",
        "no_bayar" | "no_invoice" => "INV-TEST-0001",
        "tanggal" | "jatuh_tempo" => "28-11-2026",
        "status" => "LUNAS",
        "periode" => "November 2026",
        "paket" => "Internet 20 Mbps",
        "hari_sblm_jatuh_tempo" => "3",
        "customer_id" => "CUST-TEST",
        "telepon_cs" => "0800-000-0000",
        "kode_otp" => "123456",
        _ => "-",
    }
}

#[cfg(test)]
mod tests {
    use super::check_param_text;

    #[test]
    fn ordinary_text_passes() {
        assert_eq!(check_param_text("Rp 150.000"), Ok(()));
        assert_eq!(check_param_text("Budi    Santoso"), Ok(()));
    }

    #[test]
    fn every_line_break_and_control_character_is_refused() {
        for bad in [
            "a\nb",
            "a\rb",
            "a\u{0b}b",
            "a\u{0c}b",
            "a\u{85}b",
            "a\u{2028}b",
            "a\u{2029}b",
            "a\tb",
            "a\u{0}b",
            "a\u{1b}[31m",
            "a\u{7f}",
        ] {
            assert!(check_param_text(bad).is_err(), "{bad:?} passed");
        }
    }

    #[test]
    fn whitespace_runs_count_every_unicode_space() {
        assert!(check_param_text("a     b").is_err());
        assert!(check_param_text("a\u{a0}\u{a0}\u{2003} \u{3000}b").is_err());
        assert!(check_param_text("a\u{a0}\u{a0}\u{2003} b").is_ok());
    }

    #[test]
    fn blank_and_overlong_values_are_refused() {
        assert!(check_param_text(" \u{a0} ").is_err());
        assert!(check_param_text(&"x".repeat(super::MAX_PARAM_CHARS + 1)).is_err());
    }
}
